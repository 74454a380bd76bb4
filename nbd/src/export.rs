//! [`Export`]: a named backend as clients see it (size, transmission flags, counters), and the
//! registry of exports a server offers.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::backend::DynBackend;
use crate::protocol::*;
use crate::stats::{ExportCounters, ExportStats};
use crate::{Backend, Error};

/// A named export. Cheap to clone: clones share the backend and the counters, so a caller
/// can keep a clone to read [`Export::stats`] after handing the export to a server.
#[derive(Clone)]
pub struct Export {
    name: String,
    description: Option<String>,
    pub(crate) backend: Arc<dyn DynBackend>,
    pub(crate) counters: Arc<ExportCounters>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.size())
            .field("flags", &format_args!("{:#x}", self.transmission_flags()))
            .finish()
    }
}

impl Export {
    /// An export called `name` (clients ask for it by this name; `""` is the default export
    /// of clients that name none) served from `backend`.
    pub fn new(name: impl Into<String>, backend: impl Backend) -> Self {
        Export {
            name: name.into(),
            description: None,
            backend: Arc::new(backend),
            counters: Arc::default(),
        }
    }

    /// Adds a human-readable description, shown by `nbdinfo --list`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Size in bytes, as advertised to clients.
    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.backend.read_only()
    }

    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        if self.read_only() {
            flags |= TFLAG_READ_ONLY;
        } else {
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if self.backend.can_multi_conn() {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        flags
    }

    /// Counters since the export was created.
    pub fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }

    fn validate_name(&self) -> Result<(), Error> {
        let bad = |why| Err(Error::InvalidExportName(self.name.clone(), why));
        if self.name.len() > MAX_NAME_LEN {
            return bad("longer than 4096 bytes");
        }
        if self.name.contains('\0') {
            return bad("contains NUL");
        }
        if self
            .description
            .as_deref()
            .is_some_and(|d| d.len() > MAX_NAME_LEN)
        {
            return bad("description longer than 4096 bytes");
        }
        Ok(())
    }
}

/// The exports a server offers, by name. Sorted, so `NBD_OPT_LIST` answers are stable.
#[derive(Default)]
pub(crate) struct Registry {
    exports: RwLock<BTreeMap<String, Export>>,
}

impl Registry {
    pub(crate) fn add(&self, export: Export) -> Result<(), Error> {
        export.validate_name()?;
        let mut map = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(export.name()) {
            return Err(Error::DuplicateExport(export.name.clone()));
        }
        map.insert(export.name.clone(), export);
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) -> Option<Export> {
        self.exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Export> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn list(&self) -> Vec<Export> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
