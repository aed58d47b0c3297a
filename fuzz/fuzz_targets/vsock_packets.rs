#![no_main]
//! libFuzzer entry of `vsock_packets`; the target and its invariants are in
//! `tidevm_fuzz::targets::vsock_packets`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::vsock_packets::run(data));
