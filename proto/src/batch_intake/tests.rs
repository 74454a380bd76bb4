use super::*;
use crate::batch_stream::message_chunks;
use crate::test_batches::{batch, extent, framed};
use futures::StreamExt;
use proptest::prelude::*;

/// Everything decodable from `chunks` fed in order: the batches, then the error if one.
fn decode_all(chunks: Vec<Bytes>) -> (Vec<ChangeBatch>, Option<Status>) {
    let mut rope = Rope::default();
    let mut out = Vec::new();
    for chunk in chunks {
        rope.push(chunk);
        loop {
            match rope.take_message() {
                Ok(Some(message)) => match decode_batch(message) {
                    Ok(b) => out.push(b),
                    Err(status) => return (out, Some(status)),
                },
                Ok(None) => break,
                Err(status) => return (out, Some(status)),
            }
        }
    }
    (out, None)
}

/// `bytes` cut at the given offsets (in any order, any value).
fn cut(bytes: &[u8], mut at: Vec<usize>) -> Vec<Bytes> {
    at.iter_mut().for_each(|a| *a %= bytes.len().max(1));
    at.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for a in at.into_iter().chain([bytes.len()]) {
        chunks.push(Bytes::copy_from_slice(&bytes[from..a.max(from)]));
        from = a.max(from);
    }
    chunks
}

#[test]
fn large_payloads_are_taken_from_the_frames_they_came_in() {
    let sent = batch(1, vec![extent(0, 4096, 0), extent(1 << 20, 1 << 20, 0)]);
    let chunks = message_chunks(sent.clone()).unwrap();
    let frame = chunks
        .iter()
        .find(|c| c.len() == 1 << 20)
        .expect("a chunk of its own for the 1 MiB extent")
        .clone();
    let (got, error) = decode_all(chunks);
    assert!(error.is_none(), "{error:?}");
    assert_eq!(got, vec![sent]);
    assert_eq!(
        got[0].extents[1].data.as_ptr(),
        frame.as_ptr(),
        "the 1 MiB extent was copied"
    );
}

#[test]
fn messages_cut_anywhere_decode_the_same() {
    let sent = vec![
        batch(1, vec![extent(0, 100_000, 0), extent(8192, 512, 0)]),
        ChangeBatch::default(),
        batch(3, vec![]),
        batch(4, vec![extent(1 << 30, 70_000, 0)]),
    ];
    let wire: Vec<u8> = sent.iter().flat_map(framed).collect();
    for step in [1, 3, 5, 4096, 16_384, 65_537, wire.len()] {
        let at = (step..wire.len()).step_by(step).collect();
        let (got, error) = decode_all(cut(&wire, at));
        assert!(error.is_none(), "step {step}: {error:?}");
        assert_eq!(got, sent, "step {step}");
    }
}

#[test]
fn a_message_over_the_limit_is_refused_before_it_arrives() {
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes());
    let (got, error) = decode_all(vec![Bytes::from(prefix)]);
    assert!(got.is_empty());
    assert_eq!(error.unwrap().code(), tonic::Code::OutOfRange);
}

#[test]
fn a_compressed_message_is_refused() {
    let mut wire = framed(&batch(1, vec![extent(0, 10, 0)]));
    wire[0] = 1;
    let (got, error) = decode_all(vec![Bytes::from(wire)]);
    assert!(got.is_empty());
    let status = error.unwrap();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("compressed"), "{status}");
}

#[test]
fn garbage_is_an_error_not_a_batch() {
    let mut wire = vec![0u8, 0, 0, 0, 6];
    wire.extend_from_slice(&[0xff; 6]);
    let (got, error) = decode_all(vec![Bytes::from(wire)]);
    assert!(got.is_empty());
    assert_eq!(error.unwrap().code(), tonic::Code::Internal);
}

#[tokio::test]
async fn a_body_ending_inside_a_message_ends_the_stream_with_an_error() {
    let whole = framed(&batch(1, vec![extent(0, 4096, 0)]));
    let mut wire = whole.clone();
    wire.extend_from_slice(&whole[..whole.len() - 1]);
    let body = Body::new(http_body_util::Full::new(Bytes::from(wire)));
    let got: Vec<_> = decode_batches(body).collect().await;
    assert_eq!(got.len(), 2);
    assert!(got[0].is_ok());
    let status = got[1].as_ref().unwrap_err();
    assert!(
        status.message().contains("ended inside a message"),
        "{status}"
    );
}

/// What a handler behind `BatchIntake` sees of a call to `path`: the batches it finds in the
/// request (taken twice: the second time must find nothing) and the body tonic is left.
async fn through_intake(
    path: &str,
    wire: Vec<u8>,
) -> (Option<Vec<Result<ChangeBatch, Status>>>, bool, Bytes) {
    use tower::ServiceExt;
    let handler = tower::service_fn(|http: http::Request<Body>| async move {
        let mut request = tonic::Request::from_http(http);
        let found = match take_incoming(&mut request) {
            Some(batches) => Some(batches.collect::<Vec<_>>().await),
            None => None,
        };
        let again = take_incoming(&mut request).is_some();
        let left = request.into_inner().collect().await.unwrap().to_bytes();
        Ok::<_, std::convert::Infallible>((found, again, left))
    });
    let request = http::Request::builder()
        .uri(path)
        .body(Body::new(http_body_util::Full::new(Bytes::from(wire))))
        .unwrap();
    BatchIntake::new(handler).oneshot(request).await.unwrap()
}

#[tokio::test]
async fn the_handler_finds_the_batches_of_push_and_apply_in_the_request() {
    let wire = framed(&batch(9, vec![extent(0, 4096, 0)]));
    for path in [PUSH, APPLY] {
        let (found, again, left) = through_intake(path, wire.clone()).await;
        let found = found.expect("decoded by the intake");
        assert_eq!(found.len(), 1, "{path}");
        assert_eq!(found[0].as_ref().unwrap().seq, 9, "{path}");
        assert!(!again, "{path}: taken once");
        assert!(left.is_empty(), "{path}: tonic is left an empty body");
    }
    // Any other call goes to the service untouched.
    let (found, _, left) = through_intake("/lifeboat.v1.Ingest/Hashes", wire.clone()).await;
    assert!(found.is_none());
    assert_eq!(left, Bytes::from(wire));
}

proptest! {
    /// Arbitrary bytes cut anywhere: batches or an error, never a panic, and a valid prefix
    /// decodes the same whatever the cuts.
    #[test]
    fn arbitrary_input_never_panics(
        junk in proptest::collection::vec(any::<u8>(), 0..512),
        at in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let valid = framed(&batch(5, vec![extent(0, 300, 0)]));
        let mut wire = valid.clone();
        wire.extend_from_slice(&junk);
        let (got, _) = decode_all(cut(&wire, at.clone()));
        prop_assert!(!got.is_empty());
        prop_assert_eq!(&got[0], &batch(5, vec![extent(0, 300, 0)]));
        let _ = decode_all(cut(&junk, at));
    }
}
