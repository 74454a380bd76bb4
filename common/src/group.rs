//! Receiving change batches in groups. A receiver task reads the gRPC stream into a bounded
//! channel while the previous group is being made durable, so network transfer and fsync
//! overlap; the consumer then takes everything that has arrived (up to a byte budget) as one
//! group, to be made durable with one fsync. The receiver also checks each batch's checksum
//! (a pass over every byte that used to delay the store or apply of its group); a batch that
//! fails it ends the stream with that error, after the batches before it. The consumer checks
//! the rest (`batch::verify_fields`), which needs the disk's size. Used by the process
//! server's ingest and the master target's apply.
use crate::batch::{payload_bytes, verify_checksum};
use lifeboat_proto::batch_intake::{take_incoming, BatchStream};
use lifeboat_proto::v1::ChangeBatch;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request, Status, Streaming};

/// Batches read ahead while a group is being stored.
const READ_AHEAD: usize = 16;

pub struct Groups {
    rx: mpsc::Receiver<Result<ChangeBatch, Status>>,
    /// A batch taken from the channel that did not fit the previous group.
    held: Option<ChangeBatch>,
    ended: Option<Status>,
}

impl Groups {
    /// The batches of a `Push` or `Apply` call: as `BatchIntake` decoded them when the server
    /// has it in front, tonic's stream otherwise.
    pub fn of_call(mut request: Request<Streaming<ChangeBatch>>) -> Groups {
        let inbound = take_incoming(&mut request).unwrap_or_else(|| Box::pin(request.into_inner()));
        Groups::new(inbound)
    }

    /// Starts reading `inbound` in the background.
    pub fn new(mut inbound: BatchStream) -> Groups {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        tokio::spawn(async move {
            while let Some(item) = inbound.next().await {
                let item =
                    item.and_then(|b| verify_checksum(&b).map(|()| b).map_err(|e| e.status()));
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Groups {
            rx,
            held: None,
            ended: None,
        }
    }

    /// The next group: at least one batch (waiting for it), then whatever has already arrived
    /// for the same disk, up to `max_bytes` of payload. `None` when the stream ended; the
    /// stream's error, if it ended with one, is then in `error()`.
    pub async fn next(&mut self, max_bytes: usize) -> Option<Vec<ChangeBatch>> {
        let first = match self.held.take() {
            Some(b) => b,
            None => match self.rx.recv().await? {
                Ok(b) => b,
                Err(status) => {
                    self.ended = Some(status);
                    return None;
                }
            },
        };
        let mut size = payload_bytes(&first);
        let mut group = vec![first];
        while size < max_bytes {
            match self.rx.try_recv() {
                Ok(Ok(b)) if b.disk_id == group[0].disk_id => {
                    size += payload_bytes(&b);
                    group.push(b);
                }
                Ok(Ok(b)) => {
                    self.held = Some(b);
                    break;
                }
                Ok(Err(status)) => {
                    self.ended = Some(status);
                    break;
                }
                Err(_) => break,
            }
        }
        Some(group)
    }

    pub fn error(&self) -> Option<&Status> {
        self.ended.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::seal;
    use lifeboat_proto::v1::Extent;

    fn batch(seq: u64) -> ChangeBatch {
        let mut b = ChangeBatch {
            disk_id: "d-1".into(),
            seq,
            kind: crate::batch::KIND_STREAM.into(),
            extents: vec![Extent {
                offset: 4096 * seq,
                data: vec![seq as u8; 4096].into(),
                zero_length: 0,
            }],
            ..Default::default()
        };
        seal(&mut b);
        b
    }

    #[tokio::test]
    async fn a_batch_failing_its_checksum_ends_the_stream_after_the_ones_before_it() {
        let mut corrupt = batch(3);
        corrupt.extents[0].data = vec![0xee; 4096].into();
        let items: Vec<Result<ChangeBatch, Status>> =
            vec![Ok(batch(1)), Ok(batch(2)), Ok(corrupt), Ok(batch(4))];
        let mut groups = Groups::new(Box::pin(tokio_stream::iter(items)));
        let mut seen = Vec::new();
        while let Some(group) = groups.next(usize::MAX).await {
            seen.extend(group.into_iter().map(|b| b.seq));
        }
        assert_eq!(seen, [1, 2]);
        let error = groups.error().expect("the stream ended with an error");
        assert_eq!(error.code(), tonic::Code::DataLoss, "{error:?}");
        assert!(error.message().contains("batch 3"), "{error:?}");
    }
}
