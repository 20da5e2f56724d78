//! The analyst's SQL subset, parsed into phm.v1 query parts (being built).
