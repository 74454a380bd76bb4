//! Reading whole protocol messages from an async stream, telling a clean close between
//! messages apart from a stream that ends inside one (a protocol violation).

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::Error;

/// Fills `buf`; `Ok(false)` if the stream ended before its first byte (a clean close).
/// `what` names the message for the error when it ends part-way.
pub(crate) async fn read_or_eof<R>(r: &mut R, buf: &mut [u8], what: &str) -> Result<bool, Error>
where
    R: AsyncRead + Unpin,
{
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => return Err(Error::protocol(format!("stream ended inside {what}"))),
            n => filled += n,
        }
    }
    Ok(true)
}

/// Fills `buf`; the stream ending anywhere before that is an error.
pub(crate) async fn read_exact<R>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
{
    if read_or_eof(r, buf, what).await? || buf.is_empty() {
        Ok(())
    } else {
        Err(Error::protocol(format!("stream ended inside {what}")))
    }
}

/// Reads `len` bytes into a fresh buffer, filling uninitialised capacity directly (no
/// zero-fill pass over multi-megabyte write payloads).
pub(crate) async fn read_vec<R>(r: &mut R, len: usize, what: &str) -> Result<Vec<u8>, Error>
where
    R: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut buf).await? == 0 {
            return Err(Error::protocol(format!("stream ended inside {what}")));
        }
    }
    Ok(buf)
}

/// Reads and drops `len` bytes.
pub(crate) async fn skip<R>(r: &mut R, len: u64, what: &str) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
{
    let copied = tokio::io::copy(&mut (&mut *r).take(len), &mut tokio::io::sink()).await?;
    if copied != len {
        return Err(Error::protocol(format!("stream ended inside {what}")));
    }
    Ok(())
}
