//! The client side of the two calls that stream change batches — `Ingest/Push` (agent to
//! process server) and `Replica/Apply` (process server to master target) — sending each
//! extent's payload without copying it.
//!
//! tonic encodes a message into one buffer, which for a change batch is a copy of every
//! payload byte, on the sender's busiest path, per hop. Here a batch leaves as a list of
//! chunks instead: the protobuf framing prost would write, with each large extent's `data`
//! as a chunk of its own (a reference to the bytes already in memory), handed to hyper as
//! the request body. The bytes on the wire are exactly prost's encoding (tested below), so
//! the servers can decode them with tonic; they decode them with `batch_intake`, which keeps
//! each such chunk's payload where it arrived. Only TLS copies the payload now.
use crate::v1::{ChangeBatch, Extent};
use crate::MAX_MESSAGE_BYTES;
use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::Status;
use tonic_prost::ProstDecoder;
use tower::ServiceExt;

/// Path of `Ingest/Push`.
pub const PUSH: &str = "/lifeboat.v1.Ingest/Push";
/// Path of `Replica/Apply`.
pub const APPLY: &str = "/lifeboat.v1.Replica/Apply";

/// Extent data shorter than this is copied into the framing chunk: a separate chunk (and
/// HTTP/2 frame) would cost more than the copy.
const OWN_CHUNK_FROM: usize = 16 * 1024;

/// Field numbers of `ChangeBatch.extents` and `Extent.data` (see data.proto).
const EXTENTS_FIELD: u32 = 3;
const DATA_FIELD: u32 = 2;

/// Calls the bidirectional streaming method at `path` (`PUSH` or `APPLY`), sending `batches`
/// in order; returns the stream of the server's answers, as tonic's generated client would.
pub async fn call<R, S>(
    channel: Channel,
    path: &'static str,
    batches: S,
) -> Result<Streaming<R>, Status>
where
    R: Message + Default + Send + 'static,
    S: Stream<Item = ChangeBatch> + Send + 'static,
{
    // A batch too large to send ends the request with that error, as tonic's encoder would.
    let frames = batches.flat_map(|batch| {
        let frames: Vec<Result<Frame<Bytes>, Status>> = match message_chunks(batch) {
            Ok(chunks) => chunks.into_iter().map(|c| Ok(Frame::data(c))).collect(),
            Err(status) => vec![Err(status)],
        };
        futures::stream::iter(frames)
    });
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(frames));
    // The channel adds scheme and authority, as it does for tonic's own clients.
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(body)
        .map_err(|e| Status::internal(format!("building the {path} request: {e}")))?;
    let response = channel
        .oneshot(request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let decoder = ProstDecoder::<R>::default();
    // A call refused at once answers with headers only, carrying the status.
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
        return Ok(Streaming::new_empty(decoder, response.into_body()));
    }
    let code = response.status();
    Ok(Streaming::new_response(
        decoder,
        response.into_body(),
        code,
        None,
        Some(MAX_MESSAGE_BYTES),
    ))
}

/// The gRPC message of `batch` (uncompressed flag, length, prost encoding) as chunks to send
/// one after the other; refused if longer than `MAX_MESSAGE_BYTES`, which receivers enforce.
pub(crate) fn message_chunks(mut batch: ChangeBatch) -> Result<Vec<Bytes>, Status> {
    let extents = std::mem::take(&mut batch.extents);
    // prost writes fields in field-number order: 1 and 2, the extents (3), then the rest.
    let head = ChangeBatch {
        disk_id: std::mem::take(&mut batch.disk_id),
        seq: std::mem::take(&mut batch.seq),
        ..Default::default()
    };
    let tail = batch;
    let len = head.encoded_len()
        + prost::encoding::message::encoded_len_repeated(EXTENTS_FIELD, &extents)
        + tail.encoded_len();
    if len > MAX_MESSAGE_BYTES {
        return Err(Status::out_of_range(format!(
            "batch {} of {}: {len} bytes encoded, more than the {MAX_MESSAGE_BYTES}-byte message limit",
            head.seq, head.disk_id
        )));
    }
    let mut chunks = Vec::with_capacity(2 + extents.len());
    let mut buf = BytesMut::with_capacity(64 + 32 * extents.len());
    buf.put_u8(0);
    // At most MAX_MESSAGE_BYTES (checked above), so it fits.
    buf.put_u32(len as u32);
    head.encode_raw(&mut buf);
    for extent in extents {
        encode_key(EXTENTS_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(extent.encoded_len() as u64, &mut buf);
        let Extent {
            offset,
            data,
            zero_length,
        } = extent;
        Extent {
            offset,
            ..Default::default()
        }
        .encode_raw(&mut buf);
        if !data.is_empty() {
            encode_key(DATA_FIELD, WireType::LengthDelimited, &mut buf);
            encode_varint(data.len() as u64, &mut buf);
            if data.len() < OWN_CHUNK_FROM {
                buf.put_slice(&data);
            } else {
                chunks.push(buf.split().freeze());
                chunks.push(data);
            }
        }
        Extent {
            zero_length,
            ..Default::default()
        }
        .encode_raw(&mut buf);
    }
    tail.encode_raw(&mut buf);
    chunks.push(buf.freeze());
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_batches::{self, extent, framed};

    fn batch(extents: Vec<Extent>) -> ChangeBatch {
        test_batches::batch(300, extents)
    }

    #[test]
    fn chunks_are_exactly_the_grpc_message_prost_and_tonic_would_send() {
        let cases = vec![
            ChangeBatch::default(),
            batch(vec![]),
            batch(vec![extent(0, 0, 0)]),
            batch(vec![extent(4096, 512, 0), extent(0, 0, 1 << 20)]),
            batch(vec![
                extent(1 << 30, 1 << 20, 0),
                extent(8192, OWN_CHUNK_FROM - 1, 0),
                extent(1 << 40, OWN_CHUNK_FROM, 0),
                extent(0, 3 << 20, 0),
            ]),
            ChangeBatch {
                seq: 1,
                extents: vec![extent(0, 70_000, 0)],
                ..Default::default()
            },
        ];
        for case in cases {
            let chunks = message_chunks(case.clone()).unwrap();
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(joined, framed(&case), "{case:?}");
            assert_eq!(ChangeBatch::decode(&joined[5..]).unwrap(), case);
        }
    }

    #[test]
    fn large_payloads_are_sent_from_their_own_memory() {
        let big = extent(0, 1 << 20, 0);
        let small = extent(1 << 20, 4096, 0);
        let at = big.data.as_ptr();
        let chunks = message_chunks(batch(vec![small, big])).unwrap();
        assert!(
            chunks
                .iter()
                .any(|c| c.as_ptr() == at && c.len() == 1 << 20),
            "the 1 MiB extent was copied"
        );
        assert_eq!(chunks.len(), 3, "small data stays in the framing chunk");
    }

    #[test]
    fn a_batch_over_the_message_limit_is_refused() {
        let over = batch(vec![extent(0, MAX_MESSAGE_BYTES, 0)]);
        let status = message_chunks(over).unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    }
}
