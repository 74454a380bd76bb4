//! One module per admin command group.
pub mod audit;
pub mod cluster;
pub mod passphrase;
pub mod servers;
