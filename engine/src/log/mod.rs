//! Logging of a run: TensorBoard event files, RUN_DIR/metrics.jsonl and a console progress bar.

pub mod curves;
pub mod metrics;
pub mod progress;
pub mod tensorboard;

pub use curves::write_curves;
pub use metrics::{read_metrics, MetricsLog};
pub use progress::Progress;
pub use tensorboard::{read_events, yaml_hparams, HValue, TbEvent, TbWriter};
