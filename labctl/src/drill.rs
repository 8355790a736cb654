//! Incident drills: the lab runs with a hidden, randomly drawn set of causes
//! and a trainee finds them from the signals alone.
//!
//! This is the pure logic behind `labctl drill`, with no processes and no
//! network: draw the causes from a seed ([`draw`]), seal the answer key so
//! the trainee cannot simply read it ([`seal`], [`open`]), take and log the
//! trainee's answers ([`parse_answers`], [`append_record`]), score them
//! ([`score`]) and write the texts a drill shows ([`brief`], [`render_key`]).
//!
//! Every switch has two forms in a drill: its value in the buggy preset and
//! its value in the fixed one (`l7` and `capped` are never drawn, so they
//! are not answers either).

mod answers;
mod causes;
mod score;
mod seal;
mod text;

use lab_common::config::Faults;
use serde::{Deserialize, Serialize};

pub use answers::{
    AnswerError, AnswerLogError, AnswerRecord, Answers, allowed_answers, append_record,
    parse_answers, read_records,
};
pub use causes::{CauseCount, CauseCountError, draw, form_in};
pub use score::{Score, Signal, SwitchScore, confirming_signal, score};
pub use seal::{SealError, new_token, open, seal};
pub use text::{BriefInputs, brief, render_key};

/// What a drill was started with: enough to score answers and to say, at
/// the end, what the causes were and how they were drawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillKey {
    pub seed: u64,
    /// The cause count as the operator wrote it (`all`, `2`, `random`).
    pub causes: String,
    pub faults: Faults,
    pub started_at_unix_ms: u64,
}
