//! The fixed-newstyle handshake: greeting, client flags and option haggling, up to the point
//! where the client picks an export and transmission starts.
//!
//! Options understood: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`. Everything else
//! (`STARTTLS`, `STRUCTURED_REPLY`, metadata contexts, extended headers, unknown codes) is
//! answered `NBD_REP_ERR_UNSUP`, so clients fall back to what we do support: simple replies.
//! The connection is closed only where the spec leaves no reply to give: bad option magic,
//! unknown client flags, an unknown name in `EXPORT_NAME`, absurdly long option data, or a
//! stream that ends mid-message.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::export::{Export, Registry};
use crate::protocol::*;
use crate::{wire, Error};

/// Option data we read and parse; INFO/GO carry at most a 4096-byte name plus a short list.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Longer option data is still read and refused with `ERR_TOO_BIG` up to this size; beyond
/// it the client is treated as hostile and disconnected.
const MAX_DISCARDED_OPTION_DATA: u32 = 1 << 20;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`: a page, so clients avoid
/// read-modify-write in the page cache.
const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// How a handshake ended.
pub(crate) enum Outcome {
    /// The client chose this export; the stream is now in transmission.
    Transmission(Export),
    /// The client left cleanly (`NBD_OPT_ABORT`, or closed between messages).
    Closed,
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have; the spec's only answer is to
    /// close.
    UnknownExport(String),
}

/// Runs the server side of the handshake on `r`/`w`.
pub(crate) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Registry,
    max_request: u32,
) -> Result<Outcome, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(w, &greeting).await?;

    let mut flags = [0u8; 4];
    if !wire::read_or_eof(r, &mut flags, "the client flags").await? {
        return Ok(Outcome::Closed);
    }
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The spec: the server MUST close if it does not recognise the client's flags.
        return Err(Error::protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    loop {
        let mut header = [0u8; 16];
        if !wire::read_or_eof(r, &mut header, "an option header").await? {
            return Ok(Outcome::Closed);
        }
        let (magic, rest) = header.split_at(8);
        if magic != IHAVEOPT.to_be_bytes() {
            return Err(Error::protocol("bad option magic"));
        }
        let option = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_OPTION_DATA {
            if len > MAX_DISCARDED_OPTION_DATA {
                return Err(Error::protocol(format!(
                    "option {option} carries {len} bytes"
                )));
            }
            wire::skip(r, u64::from(len), "option data").await?;
            reply(w, option, REP_ERR_TOO_BIG, b"option data too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        wire::read_exact(r, &mut data, "option data").await?;

        match option {
            OPT_EXPORT_NAME => {
                let Some(export) = lookup(exports, &data) else {
                    return Ok(Outcome::UnknownExport(
                        String::from_utf8_lossy(&data).into(),
                    ));
                };
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(w, &out).await?;
                return Ok(Outcome::Transmission(export));
            }
            OPT_ABORT => {
                // Best effort: the client may already be gone.
                let _ = reply(w, option, REP_ACK, &[]).await;
                return Ok(Outcome::Closed);
            }
            OPT_LIST if len != 0 => {
                reply(w, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
            }
            OPT_LIST => {
                let mut out = Vec::new();
                for export in exports.list() {
                    let name = export.name().as_bytes();
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(name);
                    entry.extend_from_slice(export.description().unwrap_or("").as_bytes());
                    option_reply(&mut out, option, REP_SERVER, &entry);
                }
                option_reply(&mut out, option, REP_ACK, &[]);
                send(w, &out).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some(request) = InfoRequest::parse(&data) else {
                    reply(w, option, REP_ERR_INVALID, b"malformed INFO/GO data").await?;
                    continue;
                };
                let Some(export) = lookup(exports, request.name) else {
                    reply(w, option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                };
                send(
                    w,
                    &info_replies(option, &export, &request.items, max_request),
                )
                .await?;
                if option == OPT_GO {
                    return Ok(Outcome::Transmission(export));
                }
            }
            _ => {
                reply(w, option, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
}

/// The `NBD_REP_INFO` items for INFO/GO, then the final ACK.
fn info_replies(option: u32, export: &Export, items: &[u16], max_request: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size().to_be_bytes());
    info.extend_from_slice(&export.transmission_flags().to_be_bytes());
    option_reply(&mut out, option, REP_INFO, &info);

    let mut sent = Vec::new();
    for &item in items {
        if sent.contains(&item) {
            continue; // a client repeating an item gets it once
        }
        sent.push(item);
        let mut info = item.to_be_bytes().to_vec();
        match item {
            INFO_NAME => info.extend_from_slice(export.name().as_bytes()),
            INFO_DESCRIPTION => match export.description() {
                Some(d) => info.extend_from_slice(d.as_bytes()),
                None => continue,
            },
            INFO_BLOCK_SIZE => {
                // Minimum 1: any alignment works (the backend handles partial blocks).
                info.extend_from_slice(&1u32.to_be_bytes());
                info.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&max_request.to_be_bytes());
            }
            _ => continue, // unknown items are ignored, as the spec asks
        }
        option_reply(&mut out, option, REP_INFO, &info);
    }
    option_reply(&mut out, option, REP_ACK, &[]);
    out
}

fn lookup(exports: &Registry, name: &[u8]) -> Option<Export> {
    std::str::from_utf8(name).ok().and_then(|n| exports.get(n))
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), Error> {
    let mut out = Vec::with_capacity(20 + data.len());
    option_reply(&mut out, option, kind, data);
    send(w, &out).await
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), Error> {
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(())
}
