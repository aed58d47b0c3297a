//! End-to-end test helpers (guest assets, running tidevm, talking to its API).
