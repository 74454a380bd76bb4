//! The server side of the two calls that stream change batches (`Ingest/Push`, `Replica/Apply`):
//! batches decoded from the HTTP/2 DATA frames they arrived in, without copying their payloads.
//!
//! tonic's decoder gathers every DATA frame of a message into one buffer before decoding it: a
//! copy of every payload byte, on each receiving hop. The senders (`batch_stream`) put each
//! large extent's data in a body chunk, so a DATA frame, of its own. Here a message stays the
//! list of frames it came in, and prost takes each `data` field as a slice of its frame when
//! the field lies in one (otherwise it is gathered: still correct, one copy as before).
//!
//! [`BatchIntake`] wraps a generated server. For the two paths it takes the request body,
//! leaves tonic an empty one, and puts the decoded stream in the request's extensions, where
//! the handler finds it with [`take_incoming`]. Everything else (routing, the response and its
//! status trailers, the caller's certificate) stays tonic's.
use crate::batch_stream::{APPLY, PUSH};
use crate::v1::ChangeBatch;
use crate::MAX_MESSAGE_BYTES;
use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use http_body_util::BodyExt;
use prost::Message;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

/// The change batches of one call, in the order sent; ends with an error if the call broke.
pub type BatchStream = Pin<Box<dyn Stream<Item = Result<ChangeBatch, Status>> + Send>>;

/// Where `BatchIntake` leaves the decoded stream for the handler (taken once).
#[derive(Clone)]
struct Incoming(Arc<Mutex<Option<BatchStream>>>);

/// The batches of a call that came through [`BatchIntake`]; `None` if it did not (the
/// handler then reads the tonic stream it was given).
pub fn take_incoming<T>(request: &mut tonic::Request<T>) -> Option<BatchStream> {
    let incoming = request.extensions_mut().remove::<Incoming>()?;
    let mut slot = incoming.0.lock().ok()?;
    slot.take()
}

/// A generated server (the Ingest or Replica service) with its batch streams decoded here.
#[derive(Debug, Clone)]
pub struct BatchIntake<S> {
    inner: S,
}

impl<S> BatchIntake<S> {
    pub fn new(inner: S) -> BatchIntake<S> {
        BatchIntake { inner }
    }
}

impl<S: NamedService> NamedService for BatchIntake<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for BatchIntake<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> S::Future {
        let path = request.uri().path();
        if path == PUSH || path == APPLY {
            let body = std::mem::replace(request.body_mut(), Body::empty());
            let batches = Incoming(Arc::new(Mutex::new(Some(decode_batches(body)))));
            request.extensions_mut().insert(batches);
        }
        self.inner.call(request)
    }
}

/// The gRPC messages of `body`, decoded as change batches.
fn decode_batches(body: Body) -> BatchStream {
    let reader = Reader {
        body,
        pending: Rope::default(),
    };
    Box::pin(futures::stream::unfold(Some(reader), |state| async move {
        let mut reader = state?;
        match reader.next_batch().await {
            Ok(Some(batch)) => Some((Ok(batch), Some(reader))),
            Ok(None) => None,
            // The stream ends after its first error.
            Err(status) => Some((Err(status), None)),
        }
    }))
}

struct Reader {
    body: Body,
    /// Received bytes not yet decoded: the rest of the frames read so far.
    pending: Rope,
}

impl Reader {
    async fn next_batch(&mut self) -> Result<Option<ChangeBatch>, Status> {
        loop {
            if let Some(message) = self.pending.take_message()? {
                return decode_batch(message).map(Some);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    // Trailers carry nothing for these calls.
                    if let Ok(data) = frame.into_data() {
                        self.pending.push(data);
                    }
                }
                Some(Err(status)) => return Err(status),
                None if self.pending.remaining() == 0 => return Ok(None),
                None => {
                    return Err(Status::internal(format!(
                        "the batch stream ended inside a message ({} bytes of it arrived)",
                        self.pending.remaining()
                    )))
                }
            }
        }
    }
}

fn decode_batch(message: Rope) -> Result<ChangeBatch, Status> {
    ChangeBatch::decode(message)
        .map_err(|e| Status::internal(format!("a change batch could not be decoded: {e}")))
}

/// Bytes kept as the frames they arrived in.
#[derive(Debug, Default)]
struct Rope {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Rope {
    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// The next gRPC message (without its 5-byte prefix), once all of it has arrived.
    fn take_message(&mut self) -> Result<Option<Rope>, Status> {
        let mut prefix = [0u8; 5];
        if !self.peek(&mut prefix) {
            return Ok(None);
        }
        if prefix[0] != 0 {
            return Err(Status::internal(
                "a compressed message on a batch stream: batches are sent uncompressed \
                 (compression happens in the process server's cache)",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes, more than the {MAX_MESSAGE_BYTES}-byte limit"
            )));
        }
        if self.len < prefix.len() + len {
            return Ok(None);
        }
        self.advance(prefix.len());
        Ok(Some(self.split_to(len)))
    }

    /// Copies the first `out.len()` bytes into `out`; false if fewer have arrived.
    fn peek(&self, out: &mut [u8]) -> bool {
        if self.len < out.len() {
            return false;
        }
        let mut filled = 0;
        for chunk in &self.chunks {
            let n = chunk.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&chunk[..n]);
            filled += n;
            if filled == out.len() {
                break;
            }
        }
        true
    }

    /// The first `len` bytes (at most `remaining`), as slices of the same frames.
    fn split_to(&mut self, len: usize) -> Rope {
        let mut taken = Rope::default();
        while taken.len < len {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let want = len - taken.len;
            if front.len() <= want {
                if let Some(chunk) = self.chunks.pop_front() {
                    self.len -= chunk.len();
                    taken.push(chunk);
                }
            } else {
                self.len -= want;
                taken.push(front.split_to(want));
            }
        }
        taken
    }
}

impl Buf for Rope {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| c.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of a rope");
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let n = cnt.min(front.len());
            front.advance(n);
            self.len -= n;
            cnt -= n;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }

    /// A slice of the frame when the bytes lie in one (this is what makes `data` free);
    /// gathered otherwise.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.len, "copy_to_bytes past the end of a rope");
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= len {
                let out = front.split_to(len);
                self.len -= len;
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            let n = self.chunk().len().min(len - out.len());
            out.extend_from_slice(&self.chunk()[..n]);
            self.advance(n);
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests;
