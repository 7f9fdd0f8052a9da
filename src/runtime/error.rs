//! [`RunError`]: the runtime's one error type.
//!
//! Actor handlers return `ActorProcessingErr` (a boxed error); the runtime's own failures are
//! boxed `RunError`s, so the scheduler and the supervisor tell them apart by downcasting, never
//! by reading message text. A device error is not one of them: a backend op that fails panics
//! with the op and the device (see the `Backend` trait), which fails the stage's actor, and the
//! supervisor reports that as a named actor failure ([`RunError::ActorFailed`]).

use ractor::ActorProcessingErr;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RunError {
    /// An actor of the pipeline is gone (it failed or was stopped). The scheduler does not fail on this:
    /// the stage's own failure reaches the supervisor, which names it and decides what to do.
    #[error("stage gone: {0}")]
    StageGone(String),
    /// The training loss (mean over the step) is not finite; the weights of the last good step
    /// were checkpointed to `checkpoint` when there was one.
    #[error("training loss became {loss} at step {step} (depth {depth}){}", last_good(checkpoint))]
    NonFiniteLoss { step: u64, depth: usize, loss: f32, checkpoint: Option<String> },
    /// A forced stop (a second signal, or the stop grace period running out) ended the run at a
    /// micro-batch boundary; the step in progress was not applied.
    #[error("forced stop at step {step}: the step in progress was dropped{}", last_good(checkpoint))]
    ForcedStop { step: u64, checkpoint: Option<String> },
    /// A training shard could not be read (changed or truncated under the run).
    #[error("data: {0}")]
    Data(String),
    /// Reading, writing or restoring a checkpoint failed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The config, the data or the growth plan cannot be run as given.
    #[error("{0}")]
    Config(String),
    /// A device could not be opened or an actor could not start on it.
    #[error("device: {0}")]
    Device(String),
    /// An actor of the run failed (a panic, a device error): who, at which step, and why.
    #[error("{0}")]
    ActorFailed(String),
    /// A control request that cannot be done now (no expansion left, the pipeline is restarting).
    #[error("{0}")]
    Refused(String),
    /// A message that the protocol does not allow here (a bug, reported rather than ignored).
    #[error("protocol: {0}")]
    Protocol(String),
}

fn last_good(checkpoint: &Option<String>) -> String {
    checkpoint.as_ref().map(|p| format!("; the last good state is checkpointed in {p}")).unwrap_or_default()
}

impl RunError {
    /// Whether a boxed actor error is [`RunError::StageGone`].
    pub fn is_stage_gone(e: &ActorProcessingErr) -> bool {
        matches!(e.downcast_ref::<RunError>(), Some(RunError::StageGone(_)))
    }

    /// The error inside an actor error: a `RunError` as it is, anything else as `ActorFailed`.
    pub fn from_actor(e: &ActorProcessingErr) -> RunError {
        match e.downcast_ref::<RunError>() {
            Some(r) => r.clone(),
            None => RunError::ActorFailed(e.to_string()),
        }
    }
}

/// The error of an actor that could not start, as a `RunError`: the error its start-up returned
/// (ractor reports any start-up error as "Actor panicked during startup", panic or not), or,
/// for other spawn failures, `Device` with `what` prefixed.
pub fn from_spawn(what: &str, e: ractor::SpawnErr) -> RunError {
    match e {
        ractor::SpawnErr::StartupFailed(inner) => match inner.downcast_ref::<RunError>() {
            Some(r) => r.clone(),
            None => RunError::Device(format!("{what}: {inner}")),
        },
        other => RunError::Device(format!("{what}: {other}")),
    }
}

/// Box a `RunError` for an actor handler.
pub fn boxed(e: RunError) -> ActorProcessingErr {
    Box::new(e)
}
