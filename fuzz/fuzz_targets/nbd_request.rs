#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::nbd_request`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::nbd_request(data));
