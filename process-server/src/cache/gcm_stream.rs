//! AES-256-GCM over a message written in pieces, each piece encrypted straight from where it
//! lies into its place in the output: the cache seals a batch while prost encodes it, so the
//! batch's data is read once (by the cipher) instead of copied into the record and then
//! encrypted there. The copy was 4–5% of an initial sync's CPU (perf, benchmark (b)).
//!
//! GCM is a stream cipher with a running MAC, so the output is byte for byte what one
//! in-place seal of the whole encoding gives (the unit test holds it to that): records
//! sealed either way read back the same. aws-lc-rs seals only whole messages in place, hence
//! aws-lc's streaming `EVP_CIPHER` interface here, the same library and the same AES-GCM code.
//!
//! `GcmStream` is a `BufMut` for prost: `put_slice` and `put` encrypt from the caller's
//! memory; anything written through `chunk_mut` lands in the output as plaintext and is
//! encrypted in place by `advance_mut`.
use aws_lc_sys as ffi;
use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut};
use std::io;
use std::os::raw::c_int;
use std::ptr;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// Pieces longer than this are cut, so each length fits the C `int` the interface takes.
const MAX_PIECE: usize = 1 << 30;

/// A seal in progress into `out`, which must be filled exactly.
pub struct GcmStream<'a> {
    ctx: *mut ffi::EVP_CIPHER_CTX,
    out: &'a mut [u8],
    pos: usize,
    /// A piece the cipher refused or one written past the end: `finish` reports it (the
    /// `BufMut` methods cannot return errors).
    failed: Option<&'static str>,
}

impl<'a> GcmStream<'a> {
    pub fn new(
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        out: &'a mut [u8],
    ) -> io::Result<GcmStream<'a>> {
        // SAFETY: a new context, owned by the value returned (freed by its Drop).
        let ctx = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            return Err(io::Error::other("out of memory for a cipher context"));
        }
        let stream = GcmStream {
            ctx,
            out,
            pos: 0,
            failed: None,
        };
        // SAFETY: the key and nonce have the lengths AES-256-GCM takes (its default nonce
        // length is 12); the AAD goes in with a null output, as the interface defines.
        let ok = unsafe {
            ffi::EVP_EncryptInit_ex(
                ctx,
                ffi::EVP_aes_256_gcm(),
                ptr::null_mut(),
                key.as_ptr(),
                nonce.as_ptr(),
            ) == 1
                && stream.update(ptr::null_mut(), aad.as_ptr(), aad.len()) == Some(aad.len())
        };
        if !ok {
            return Err(io::Error::other("setting up AES-256-GCM failed"));
        }
        Ok(stream)
    }

    /// Runs the cipher over `len` bytes at `input` (a piece of at most `MAX_PIECE`), writing
    /// to `output` (null for AAD); the bytes written, or `None` if the cipher refused.
    ///
    /// # Safety
    /// `input` must be readable and `output`, unless null, writable for `len` bytes; they
    /// may be equal (in place) but must not otherwise overlap.
    unsafe fn update(&self, output: *mut u8, input: *const u8, len: usize) -> Option<usize> {
        let mut written: c_int = 0;
        let ok = ffi::EVP_EncryptUpdate(self.ctx, output, &mut written, input, len as c_int);
        (ok == 1).then_some(written as usize)
    }

    /// Encrypts `len` bytes at `input` into the output at `pos`.
    fn encrypt_from(&mut self, input: *const u8, len: usize) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_PIECE);
            if self.out.len() - self.pos < n {
                self.failed = Some("the message is longer than its record");
                return;
            }
            // SAFETY: `input` has `len` readable bytes (the callers' slices) and the output
            // `n` writable ones from `pos` (checked above); a caller's slice cannot overlap
            // `out`, which this value borrows mutably, and the in-place case passes equal
            // pointers.
            let written = unsafe {
                let output = self.out.as_mut_ptr().add(self.pos);
                self.update(output, input.add(done), n)
            };
            if written != Some(n) {
                self.failed = Some("AES-256-GCM refused a piece");
                return;
            }
            self.pos += n;
            done += n;
        }
    }

    /// Ends the seal: the tag, once every byte of the output was written.
    pub fn finish(self) -> io::Result<[u8; TAG_LEN]> {
        if let Some(why) = self.failed {
            return Err(io::Error::other(why));
        }
        if self.pos != self.out.len() {
            return Err(io::Error::other("the message is shorter than its record"));
        }
        let mut tag = [0u8; TAG_LEN];
        let mut written: c_int = 0;
        // SAFETY: GCM's final step writes nothing to `out` (it is a stream mode) and the tag
        // control copies TAG_LEN bytes into `tag`.
        let ok = unsafe {
            ffi::EVP_EncryptFinal_ex(self.ctx, tag.as_mut_ptr(), &mut written) == 1
                && written == 0
                && ffi::EVP_CIPHER_CTX_ctrl(
                    self.ctx,
                    ffi::EVP_CTRL_GCM_GET_TAG,
                    TAG_LEN as c_int,
                    tag.as_mut_ptr().cast(),
                ) == 1
        };
        if !ok {
            return Err(io::Error::other("finishing AES-256-GCM failed"));
        }
        Ok(tag)
    }
}

impl Drop for GcmStream<'_> {
    fn drop(&mut self) {
        // SAFETY: made by EVP_CIPHER_CTX_new in `new`, freed once, here.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.ctx) }
    }
}

// SAFETY: `chunk_mut` hands out the unwritten rest of `out` (initialised memory) and
// `advance_mut` moves past bytes the caller wrote there, after encrypting them in place.
unsafe impl BufMut for GcmStream<'_> {
    fn remaining_mut(&self) -> usize {
        self.out.len() - self.pos
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let at = self.out.as_mut_ptr().wrapping_add(self.pos).cast_const();
        self.encrypt_from(at, cnt);
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        UninitSlice::new(&mut self.out[self.pos..])
    }

    fn put_slice(&mut self, src: &[u8]) {
        self.encrypt_from(src.as_ptr(), src.len());
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let chunk = src.chunk();
            let n = chunk.len();
            self.encrypt_from(chunk.as_ptr(), n);
            src.advance(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

    fn sealed_whole(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
        let mut data = plain.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .unwrap();
        data.extend_from_slice(tag.as_ref());
        data
    }

    #[test]
    fn pieces_seal_to_the_same_bytes_as_one_in_place_seal() {
        let key = [7u8; 32];
        let nonce = [9u8; 12];
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut out = vec![0u8; plain.len()];
        let mut stream = GcmStream::new(&key, &nonce, b"disk/seq", &mut out).unwrap();
        // Odd piece sizes, through each way in: a slice, a Buf, and memory written in place.
        stream.put_slice(&plain[..1]);
        stream.put_u8(plain[1]);
        stream.put(&plain[2..1000]);
        stream.put_slice(&plain[1000..50_017]);
        let rest = &plain[50_017..];
        let chunk = stream.chunk_mut();
        chunk[..rest.len()].copy_from_slice(rest);
        unsafe { stream.advance_mut(rest.len()) };
        let tag = stream.finish().unwrap();
        out.extend_from_slice(&tag);
        assert_eq!(out, sealed_whole(&key, nonce, b"disk/seq", &plain));
    }

    #[test]
    fn a_message_that_does_not_fill_its_record_exactly_is_an_error() {
        let mut out = vec![0u8; 10];
        let mut short = GcmStream::new(&[1; 32], &[2; 12], b"", &mut out).unwrap();
        short.put_slice(b"12345");
        assert!(short.finish().is_err());
        let mut out = vec![0u8; 4];
        let mut long = GcmStream::new(&[1; 32], &[2; 12], b"", &mut out).unwrap();
        long.put_slice(b"12345");
        assert!(long.finish().is_err());
    }
}
