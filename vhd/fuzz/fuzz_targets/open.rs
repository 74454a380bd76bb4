//! Opens arbitrary bytes as a VHD, reads what it accepts, writes to it, flushes and reopens.
//! The first input byte chooses whether the footer and header checksums are repaired first,
//! so the fuzzer also gets past the checksum test into the layout checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let mut bytes = data.to_vec();
    if mode & 1 == 1 {
        fix_checksums(&mut bytes);
    }
    let path = std::env::temp_dir().join(format!("vhd-fuzz-{}.vhd", std::process::id()));
    if std::fs::write(&path, &bytes).is_err() {
        return;
    }
    if let Ok(img) = vhd::Image::open(&path) {
        let len = img.size().min(1 << 20);
        let mut buf = vec![0u8; len as usize];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.read_at(&mut buf, img.size() - len);
        let _ = img.allocated_ranges();
    }
    if mode & 2 == 2 {
        if let Ok(mut img) = vhd::Image::open_rw(&path) {
            let size = img.size();
            let data = [0x5au8; 4096];
            let n = size.min(4096);
            img.write_at(&data[..n as usize], size - n)
                .expect("write to an accepted image");
            img.close().expect("flush an accepted image");
            let img = vhd::Image::open(&path).expect("an image the crate wrote must reopen");
            let mut back = vec![0u8; n as usize];
            img.read_at(&mut back, size - n).expect("read back");
            assert_eq!(back, &data[..n as usize]);
        }
    }
});

/// Recomputes the checksums of the footer copy, the end footer and the header at 512.
fn fix_checksums(b: &mut [u8]) {
    let fix = |b: &mut [u8], at: usize, len: usize, field: usize| {
        if at + len > b.len() {
            return;
        }
        let s = &mut b[at..at + len];
        let sum = !s
            .iter()
            .enumerate()
            .filter(|(i, _)| !(field..field + 4).contains(i))
            .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
        s[field..field + 4].copy_from_slice(&sum.to_be_bytes());
    };
    let n = b.len();
    fix(b, 0, 512, 64);
    if n >= 512 {
        fix(b, n - 512, 512, 64);
    }
    fix(b, 512, 1024, 36);
}
