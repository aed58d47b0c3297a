#![no_main]
//! libFuzzer entry of `cli_options`; the target and its invariants are in
//! `tidevm_fuzz::targets::cli_options`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::cli_options::run(data));
