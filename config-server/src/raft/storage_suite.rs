//! openraft's own storage test suite, run against the sled log store and state machine.
use super::log_store::SledLogStore;
use super::state_machine::SledStateMachine;
use super::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, SledLogStore, SledStateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, SledLogStore, SledStateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = super::open_db(dir.path()).expect("open sled");
        let log = SledLogStore::open(&db).expect("log trees");
        let sm = SledStateMachine::open(&db).expect("state tree");
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_storage_passes_openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)?;
    Ok(())
}
