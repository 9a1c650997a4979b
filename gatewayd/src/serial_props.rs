//! Properties of the serial line core: framing and the reading of an answer do not depend on
//! how the bytes are split into reads, no line exceeds its bound, and no value can end a
//! request line early.

use crate::device::serial::exchange::{Exchange, Heard, ReadError};
use crate::device::serial::frame::{render_request, FrameError, Framer, Pattern};
use crate::device::serial::rules::{Block, LineRules, ReplyRules};
use crate::template::Template;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Cut points for `len` bytes: `cuts` indexes, sorted, deduplicated.
fn chunks<'b>(bytes: &'b [u8], cuts: &[prop::sample::Index]) -> Vec<&'b [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

/// Every frame the framer gives after each read, in order.
fn frames(framer: &mut Framer, reads: &[&[u8]]) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut out = Vec::new();
    for r in reads {
        framer.push(r);
        out.extend(std::iter::from_fn(|| framer.next_frame()));
    }
    out
}

/// Terminators of 1 to 4 bytes, self-overlapping ones (`aa`, `aba`) included.
fn terminator() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
        prop::collection::vec(prop::sample::select(b"ab\r\n".to_vec()), 1..=4),
    ]
}

/// Streams of pieces ended by `t` or not, so lines of every length (empty, at the limit,
/// over it) and terminators split across reads all occur.
fn stream(t: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        2 => Just(t),
        3 => prop::collection::vec(prop::sample::select(b"ab\r\nx".to_vec()), 0..12),
        1 => prop::collection::vec(any::<u8>(), 0..4),
    ];
    prop::collection::vec(piece, 0..16).prop_map(|p| p.concat())
}

fn patterns(p: &[&str]) -> Vec<Pattern> {
    p.iter().map(|p| Pattern::parse(p).unwrap()).collect()
}

/// Line rules and reply rules of a few kinds: echo or not, with or without ignored lines,
/// one line, a fixed number of lines or lines until one matches.
fn rules() -> impl Strategy<Value = (LineRules, ReplyRules)> {
    (any::<bool>(), any::<bool>(), 0..3u8).prop_map(|(echo, ignore, block)| {
        let line = LineRules {
            echo,
            ignore: if ignore {
                patterns(&["#.*", r"STATUS \d"])
            } else {
                Vec::new()
            },
            busy: patterns(&["BUSY"]),
        };
        let reply = ReplyRules {
            errors: patterns(&[r"ERR (?P<code>\d+)"]),
            busy: Vec::new(),
            block: match block {
                0 => Block::One,
                1 => Block::Lines(2),
                _ => Block::Until(Pattern::parse("END").unwrap()),
            },
        };
        (line, reply)
    })
}

/// What a device sends after a request: the echo (often first), answers, ignored, busy and
/// error lines, noise, lines over the limit, terminators alone. `Z` only ever comes before
/// the request.
fn answer_stream(request: &'static [u8], t: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        Just(&b"TEMP 21"[..]),
        Just(&b"OK"[..]),
        Just(&b"END"[..]),
        Just(&b"# note"[..]),
        Just(&b"STATUS 1"[..]),
        Just(&b"BUSY"[..]),
        Just(&b"ERR 3"[..]),
        Just(&b""[..]),
        Just(&[b'w'; 20][..]),
        Just(&[b'y'; 30][..]),
    ];
    let line = prop_oneof![
        8 => text.prop_map(move |l| [l, t].concat()),
        1 => Just(request.to_vec()),
        1 => prop::collection::vec(any::<u8>().prop_filter("no Z", |b| *b != b'Z'), 1..4),
        1 => Just(request[..request.len() / 2].to_vec()),
    ];
    (prop::bool::weighted(0.7), prop::collection::vec(line, 0..6)).prop_map(move |(echo, lines)| {
        let mut out = if echo { request.to_vec() } else { Vec::new() };
        out.extend(lines.concat());
        out
    })
}

/// What arrived before the request: whole lines, half lines, noise, all marked with `Z`.
fn before_stream(t: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"Z".to_vec()),
        Just(b"ZTEMP 9".to_vec()),
        Just(b"#Z".to_vec()),
        Just(b"STATUSZ".to_vec()),
        Just(t.to_vec()),
        Just(t[..1].to_vec()),
    ];
    prop::collection::vec(piece, 0..5).prop_map(|p| p.concat())
}

const MAX_FRAME: usize = 24;
const MAX_ANSWER: usize = 40;

/// Reads the answer to `request` from `reads`; the outcome, and what the port holds once every
/// read has arrived (the reads after the outcome go to the port's framer).
fn exchange(
    request: &[u8],
    t: &[u8],
    before: &[u8],
    reads: &[&[u8]],
    (line, reply): &(LineRules, ReplyRules),
) -> (Option<Result<Heard, ReadError>>, Vec<u8>) {
    let mut framer = Framer::new(t, MAX_FRAME);
    framer.push(before);
    let mut x = Exchange::new(request, framer, line, reply, MAX_ANSWER);
    let mut reads = reads.iter();
    let mut outcome = None;
    for r in reads.by_ref() {
        outcome = x.push(r);
        if outcome.is_some() {
            break;
        }
    }
    let mut framer = x.into_framer();
    for r in reads {
        framer.push(r);
    }
    (outcome, framer.pending().to_vec())
}

/// The same outcome, except that an echo mismatch names the bytes it had seen when it was
/// judged, which depends on the reads.
fn same_outcome(
    a: &Option<Result<Heard, ReadError>>,
    b: &Option<Result<Heard, ReadError>>,
) -> bool {
    match (a, b) {
        (Some(Err(ReadError::Echo { .. })), Some(Err(ReadError::Echo { .. }))) => true,
        _ => a == b,
    }
}

/// Printable template text; `{`/`}` stay out so placeholders are only the ones put there.
fn text() -> impl Strategy<Value = String> {
    "[A-Z ;#|~é?*0-9]{0,4}"
}

/// Any request terminator: a value holds no control character and no character of the
/// terminator, so it can never take part in one, printable or not.
fn safe_terminator() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\r\n".to_string()),
        Just("\r".to_string()),
        Just(";;".to_string()),
        any::<char>().prop_map(String::from),
        "[;#|~a-z]{1,8}",
        "[;#|~a-z]{0,3}[\\x00-\\x1f\\x7f][;#|~a-z\\r\\n]{0,3}",
    ]
}

/// Values that try to end the line: the terminator, its pieces, control characters.
fn hostile(t: String) -> impl Strategy<Value = Value> {
    let mut pieces: Vec<String> = vec!["\r\n".into(), "\u{0}".into(), "\u{85}".into(), "X".into()];
    pieces.push(t.clone());
    pieces.extend(t.chars().map(String::from));
    prop_oneof![
        3 => prop::collection::vec(
            prop_oneof![prop::sample::select(pieces), any::<String>()],
            0..4,
        )
        .prop_map(|p| Value::from(p.concat())),
        1 => any::<i64>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!({"k": "a\r\nRESET"})),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn framing_does_not_depend_on_how_bytes_are_split(
        (t, max_len, bytes) in (terminator(), 1..24usize)
            .prop_flat_map(|(t, max_len)| (Just(t.clone()), Just(max_len), stream(t))),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut whole = Framer::new(&t, max_len);
        let mut split = Framer::new(&t, max_len);
        let one = frames(&mut whole, &[&bytes]);
        let many = frames(&mut split, &chunks(&bytes, &cuts));
        // An over-long line drops what is buffered, which depends on the reads: the frames
        // agree up to and including the first error, and entirely without one.
        let upto = |f: &[Result<Vec<u8>, FrameError>]| {
            f.iter().position(Result::is_err).map_or(f.len(), |i| i + 1)
        };
        prop_assert_eq!(&one[..upto(&one)], &many[..upto(&many)]);
        if one.iter().all(Result::is_ok) {
            prop_assert_eq!(&one, &many);
            prop_assert_eq!(whole.pending(), split.pending());
            // Nothing lost: the lines and their terminators, then what is pending.
            let mut again: Vec<u8> = one
                .iter()
                .flat_map(|f| [f.as_ref().unwrap().as_slice(), &t].concat())
                .collect();
            again.extend_from_slice(whole.pending());
            prop_assert_eq!(again, bytes);
        }
        for f in one.iter().chain(&many).flatten() {
            prop_assert!(f.len() <= max_len, "{} bytes, limit {}", f.len(), max_len);
            prop_assert!(!f.windows(t.len()).any(|w| w == t.as_slice()));
        }
    }

    #[test]
    fn an_answer_does_not_depend_on_how_bytes_are_split(
        (request, t, before, bytes) in prop_oneof![
            Just((&b"TEMP?\r\n"[..], &b"\r\n"[..])),
            Just((&b"SETP 2\r"[..], &b"\r\n"[..])),
            Just((&b"SETP 2\r"[..], &b"\r"[..])),
        ]
        .prop_flat_map(|(request, t)| {
            (Just(request), Just(t), before_stream(t), answer_stream(request, t))
        }),
        rules in rules(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let (one, one_rest) = exchange(request, t, &before, &[&bytes], &rules);
        let (many, many_rest) = exchange(request, t, &before, &chunks(&bytes, &cuts), &rules);
        prop_assert!(same_outcome(&one, &many), "{:?} vs {:?}", one, many);
        if !matches!(one, Some(Err(ReadError::Frame(_)))) {
            prop_assert_eq!(one_rest, many_rest);
        }
        if let Some(Ok(heard)) = &one {
            let text = match heard {
                Heard::Answer(a) => a.clone(),
                Heard::Busy(s) | Heard::Error(s) => s.text.clone(),
            };
            prop_assert!(text.len() <= MAX_ANSWER, "{text:?}");
            prop_assert!(text.lines().all(|l| l.chars().count() <= MAX_FRAME), "{text:?}");
            prop_assert!(!text.contains('Z'), "a line from before the request: {text:?}");
        }
    }

    #[test]
    fn a_value_never_ends_a_request_line(
        (t, values) in safe_terminator().prop_flat_map(|t| {
            (Just(t.clone()), prop::collection::vec(hostile(t), 3))
        }),
        texts in prop::collection::vec(text(), 3),
        shape in 0..3usize,
    ) {
        let template = match shape {
            0 => format!("{}{{{{a}}}}{}", texts[0], texts[1]),
            1 => format!("{{{{address}}}}{}{{{{a}}}}{}{{{{b}}}}{}", texts[0], texts[1], texts[2]),
            _ => format!("{}{{{{a}}}}{{{{b}}}}", texts[0]),
        };
        let template = Template::parse(&template).unwrap();
        // The template's own text is the integrator's: only values are under test.
        prop_assume!(!texts.concat().chars().any(|c| t.contains(c)));
        let vars: Map<String, Value> = [("a", &values[0]), ("b", &values[1])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let address = values[2].as_str();
        let line = render_request(&template, &vars, address, &t);
        let body = &line[..line.len() - t.len()];
        prop_assert!(line.ends_with(t.as_bytes()));
        prop_assert!(
            !line[..line.len() - 1].windows(t.len()).any(|w| w == t.as_bytes()),
            "{:?} holds {:?} before its end",
            String::from_utf8_lossy(&line),
            t
        );
        let body = std::str::from_utf8(body).unwrap();
        prop_assert!(!body.chars().any(char::is_control), "{body:?}");
    }
}
