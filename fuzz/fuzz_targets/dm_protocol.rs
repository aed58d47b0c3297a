#![no_main]
//! libFuzzer entry of `dm_protocol`; the target and its invariants are in
//! `tidevm_fuzz::targets::hyperv::dm_protocol`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::hyperv::dm_protocol::run(data));
