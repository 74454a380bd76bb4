//! Which connection owns a disk's batch stream at a receiver (the process server for agents'
//! push streams, the master target for process servers' apply streams).
//!
//! A sender that restarted asks where the stream stands (`take_stream`) and numbers on from
//! there with contents its old process never had. What the receiver still reads from the old
//! process's dead connection would, stored or applied after that answer, take those seqs, and
//! the new contents would be dropped as replays. So the answer makes its connection the owner,
//! and only streams on it may store or apply from then on. Both are done under the lock that
//! orders the disk's stores or applies, so a group of the old stream is either counted in
//! the answer or refused.
use std::net::SocketAddr;
use std::sync::Mutex;
use tonic::Status;

/// The owning connection: `None` until the first `take_stream` (after the receiver started),
/// when every stream may go on.
#[derive(Debug, Default)]
pub struct StreamOwner(Mutex<Option<SocketAddr>>);

impl StreamOwner {
    /// Makes `remote` the owner.
    pub fn take(&self, remote: Option<SocketAddr>) -> Result<(), Status> {
        *self.lock()? = remote;
        Ok(())
    }

    /// FAILED_PRECONDITION, saying `why`, unless a stream on `remote` may go on.
    pub fn check(
        &self,
        remote: Option<SocketAddr>,
        why: impl FnOnce() -> String,
    ) -> Result<(), Status> {
        let owner = *self.lock()?;
        if owner.is_some() && owner != remote {
            return Err(Status::failed_precondition(why()));
        }
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<SocketAddr>>, Status> {
        self.0
            .lock()
            .map_err(|_| Status::internal("stream owner lock poisoned"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_latest_taker_goes_on_once_someone_took() {
        let owner = StreamOwner::default();
        let (a, b) = (
            Some("127.0.0.1:1".parse().unwrap()),
            Some("127.0.0.1:2".parse().unwrap()),
        );
        assert!(owner.check(a, String::new).is_ok(), "nobody took it yet");
        owner.take(a).unwrap();
        owner.take(b).unwrap();
        let refused = owner.check(a, || "older".into()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert_eq!(refused.message(), "older");
        assert!(owner.check(b, String::new).is_ok());
    }
}
