#![no_main]
//! libFuzzer entry of `ch_api_body`; the target and its invariants are in
//! `tidevm_fuzz::targets::ch_api_body`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::ch_api_body::run(data));
