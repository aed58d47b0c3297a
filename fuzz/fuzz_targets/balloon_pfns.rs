#![no_main]
//! libFuzzer entry of `balloon_pfns`; the target and its invariants are in
//! `tidevm_fuzz::targets::balloon_pfns`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::balloon_pfns::run(data));
