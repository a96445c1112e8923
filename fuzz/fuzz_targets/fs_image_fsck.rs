#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::fs_image_fsck`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::fs_image_fsck(data));
