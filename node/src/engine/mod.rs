//! Differentially private aggregate engine over DataFusion (being built).
