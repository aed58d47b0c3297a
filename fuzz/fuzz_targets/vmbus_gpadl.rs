#![no_main]
//! libFuzzer entry of `vmbus_gpadl`; the target and its invariants are in
//! `tidevm_fuzz::targets::hyperv::vmbus_gpadl`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::hyperv::vmbus_gpadl::run(data));
