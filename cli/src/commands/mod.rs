//! One module per admin command group.
pub mod alerts;
pub mod audit;
pub mod balance;
pub mod cluster;
pub mod groups;
pub mod jobs;
pub mod passphrase;
pub mod plans;
pub mod policy;
pub mod protect;
pub mod recovery;
pub mod servers;
pub mod switch;
pub mod wait;
