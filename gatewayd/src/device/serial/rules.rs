//! Serial configuration compiled once at load (templates parsed, regexes compiled), as plain
//! core types: how a device's lines are read and what one action sends and expects. Built by
//! `config::serial`; a call never compiles anything, so it cannot fail on configuration.

use super::answer::ResponseSpec;
use super::frame::Pattern;
use crate::template::Template;

/// Largest answer of an action, bytes of its text (a block's lines joined with `\n`).
pub const MAX_ANSWER: usize = 65_536;

/// Most lines a `lines = N` answer may have.
pub const MAX_LINES: usize = 1_000;

/// How one device's lines are read, whatever the action: its port's settings with its own.
#[derive(Debug, Clone, Default)]
pub struct LineRules {
    /// The device sends back every request (its exact bytes) before answering.
    pub echo: bool,
    /// Lines that never answer a request (unsolicited status lines, prompts).
    pub ignore: Vec<Pattern>,
    /// Lines that say the device is busy and did not act.
    pub busy: Vec<Pattern>,
}

/// How many lines make an answer.
#[derive(Debug, Clone, Default)]
pub enum Block {
    /// One line.
    #[default]
    One,
    /// Exactly this many lines.
    Lines(usize),
    /// Lines up to and including the first that matches.
    Until(Pattern),
}

/// How one action's answer is read off the line: the lines that end it early (busy, error)
/// and how many lines it has.
#[derive(Debug, Clone, Default)]
pub struct ReplyRules {
    /// Error lines; the `code` and `text` captures say what failed.
    pub errors: Vec<Pattern>,
    /// Busy lines of this action, in addition to the device's.
    pub busy: Vec<Pattern>,
    pub block: Block,
}

/// The serial half of an action, compiled.
#[derive(Debug, Clone)]
pub struct SerialAction {
    /// The request line, without its terminator.
    pub request: Template,
    /// How the answer is read off the line.
    pub reply: ReplyRules,
    /// How the complete answer becomes the result.
    pub response: ResponseSpec,
}
