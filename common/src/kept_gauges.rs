//! Gauges that are set on events or once per heartbeat, kept alive until their subject goes.
//!
//! The Prometheus exporter would keep every gauge at its last value forever: a disk that is no
//! longer replicated would go on showing the RPO it had when it was unprotected, and a
//! configuration server that stopped leading would go on showing the leader's figures. So
//! `telemetry::init_metrics` drops a gauge nobody set for [`IDLE`]. Gauges set on a short
//! timer (the configuration server's, every second) need nothing more. The others — set at
//! start, or with each heartbeat, which may be minutes apart — are set through this module,
//! which remembers their values and sets them again every [`REFRESH`] until they are forgotten:
//! [`set_family`] forgets the series of a family that its latest call did not name.
use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// How long a gauge nobody sets stays on `/metrics`.
pub const IDLE: Duration = Duration::from_secs(60);
/// How often kept gauges are set again (well inside [`IDLE`]).
pub const REFRESH: Duration = Duration::from_secs(15);

type Labels = Vec<(&'static str, String)>;

/// Name → labels → value of every kept gauge.
static KEPT: LazyLock<Mutex<BTreeMap<&'static str, BTreeMap<Labels, f64>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

fn publish(name: &'static str, labels: &Labels, value: f64) {
    let labels: Vec<metrics::Label> = labels
        .iter()
        .map(|(k, v)| metrics::Label::new(*k, v.clone()))
        .collect();
    metrics::gauge!(name, labels).set(value);
}

/// Sets the unlabelled gauge `name` and keeps it.
pub fn set(name: &'static str, value: f64) {
    set_labelled(name, Vec::new(), value);
}

/// Sets one series of `name` and keeps it (other series of `name` are left as they are).
pub fn set_labelled(name: &'static str, labels: Labels, value: f64) {
    publish(name, &labels, value);
    if let Ok(mut kept) = KEPT.lock() {
        kept.entry(name).or_default().insert(labels, value);
    }
}

/// Sets every series of `name` in `series` and forgets the ones it does not name: they leave
/// `/metrics` within [`IDLE`].
pub fn set_family(name: &'static str, series: Vec<(Labels, f64)>) {
    for (labels, value) in &series {
        publish(name, labels, *value);
    }
    if let Ok(mut kept) = KEPT.lock() {
        kept.insert(name, series.into_iter().collect());
    }
}

/// Sets every kept gauge again, every [`REFRESH`], on a thread of its own (started once).
pub(crate) fn start_refreshing(every: Duration) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("kept-gauges".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                refresh();
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the thread that keeps gauges fresh: {e}");
        }
    });
}

fn refresh() {
    let Ok(kept) = KEPT.lock() else { return };
    for (name, family) in kept.iter() {
        for (labels, value) in family {
            publish(name, labels, *value);
        }
    }
}
