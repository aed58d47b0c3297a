#![no_main]
//! libFuzzer entry of `api_request`; the target and its invariants are in
//! `tidevm_fuzz::targets::api_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::api_request::run(data));
