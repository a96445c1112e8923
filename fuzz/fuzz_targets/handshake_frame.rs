#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::handshake_frame`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::handshake_frame(data));
