#![no_main]
//! libFuzzer entry of `balloon_queue`; the target and its invariants are in
//! `tidevm_fuzz::targets::balloon_queue`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::balloon_queue::run(data));
