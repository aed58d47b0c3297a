#![no_main]
//! libFuzzer entry of `vmbus_server`; the target and its invariants are in
//! `tidevm_fuzz::targets::hyperv::vmbus_server`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::hyperv::vmbus_server::run(data));
