#![no_main]
//! libFuzzer entry of `balloon_stats`; the target and its invariants are in
//! `tidevm_fuzz::targets::balloon_stats`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::balloon_stats::run(data));
