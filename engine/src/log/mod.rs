//! Logging of a run: TensorBoard event files, RUN_DIR/metrics.jsonl and a console progress bar.

pub mod metrics;
pub mod progress;
pub mod tensorboard;

pub use metrics::{read_metrics, MetricsLog};
pub use progress::Progress;
pub use tensorboard::{read_events, yaml_hparams, HValue, TbEvent, TbWriter};
