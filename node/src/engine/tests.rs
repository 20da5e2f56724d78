//! Engine tests: fixtures written to a temp dir, run through load/execute.
