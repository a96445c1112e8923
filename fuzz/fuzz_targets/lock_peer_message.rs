#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::lock_peer_message`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::lock_peer_message(data));
