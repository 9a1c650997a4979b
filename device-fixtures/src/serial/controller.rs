//! The simulated temperature controller's command set, with no I/O: one request line in, at
//! most one answer line out. Several units may share the line (RS-485 multi-drop): each has
//! an address that prefixes the requests meant for it, and only that unit answers.

use std::collections::BTreeMap;

/// Answer to `*IDN?`.
pub const IDENTITY: &str = "ACME TC-100,SN1234,1.0";
/// The temperature every unit reads.
pub const TEMPERATURE: f64 = 21.5;
/// Setpoint of a unit at power-up.
pub const INITIAL_SETPOINT: f64 = 20.0;
/// Accepted setpoints, inclusive.
pub const SETPOINT_RANGE: (f64, f64) = (0.0, 100.0);

/// The units on one line, by address (`""` for a single unaddressed unit).
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    setpoints: BTreeMap<String, f64>,
}

impl Controller {
    /// Units with these addresses; no address gives one unit that answers every line.
    pub fn new(addresses: &[String]) -> Self {
        let setpoints = if addresses.is_empty() {
            BTreeMap::from([(String::new(), INITIAL_SETPOINT)])
        } else {
            addresses
                .iter()
                .map(|a| (a.clone(), INITIAL_SETPOINT))
                .collect()
        };
        Self { setpoints }
    }

    /// Setpoint per unit address.
    pub fn setpoints(&self) -> &BTreeMap<String, f64> {
        &self.setpoints
    }

    /// The answer (without terminator) of the unit `line` addresses, or `None` when no unit
    /// is addressed.
    pub fn answer(&mut self, line: &str) -> Option<String> {
        // The longest matching address wins ("1" and "10" may share a bus).
        let (address, command) = self
            .setpoints
            .keys()
            .filter_map(|a| line.strip_prefix(a.as_str()).map(|rest| (a.clone(), rest)))
            .max_by_key(|(a, _)| a.len())?;
        let command = command.trim();
        let setpoint = self.setpoints.get_mut(&address)?;
        Some(match command {
            "*IDN?" => IDENTITY.to_string(),
            "TEMP?" => format!("TEMP {TEMPERATURE}"),
            "SETP?" => format!("SETP {setpoint}"),
            _ => match command.strip_prefix("SETP ") {
                Some(value) => match value.trim().parse::<f64>() {
                    Ok(v) if (SETPOINT_RANGE.0..=SETPOINT_RANGE.1).contains(&v) => {
                        *setpoint = v;
                        "OK".to_string()
                    }
                    Ok(_) => "ERR 3 OUT OF RANGE".to_string(),
                    Err(_) => "ERR 2 BAD VALUE".to_string(),
                },
                None => "ERR 1 UNKNOWN COMMAND".to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_unit_answers_everything() {
        let mut c = Controller::new(&[]);
        assert_eq!(c.answer("*IDN?").as_deref(), Some(IDENTITY));
        assert_eq!(c.answer("TEMP?").as_deref(), Some("TEMP 21.5"));
        assert_eq!(c.answer("SETP?").as_deref(), Some("SETP 20"));
        assert_eq!(c.answer("SETP 30").as_deref(), Some("OK"));
        assert_eq!(c.answer("SETP?").as_deref(), Some("SETP 30"));
        assert_eq!(
            c.answer("SETP 100.5").as_deref(),
            Some("ERR 3 OUT OF RANGE")
        );
        assert_eq!(c.answer("SETP -1").as_deref(), Some("ERR 3 OUT OF RANGE"));
        assert_eq!(c.answer("SETP warm").as_deref(), Some("ERR 2 BAD VALUE"));
        assert_eq!(c.answer("FLY").as_deref(), Some("ERR 1 UNKNOWN COMMAND"));
        assert_eq!(c.setpoints()[""], 30.0);
    }

    #[test]
    fn addressed_units_answer_only_their_own_lines() {
        let mut c = Controller::new(&["01".into(), "02".into()]);
        assert_eq!(c.answer("01SETP 40").as_deref(), Some("OK"));
        assert_eq!(c.answer("02SETP 60").as_deref(), Some("OK"));
        assert_eq!(c.answer("01SETP?").as_deref(), Some("SETP 40"));
        assert_eq!(c.answer("02SETP?").as_deref(), Some("SETP 60"));
        assert_eq!(c.answer("03TEMP?"), None);
        assert_eq!(c.answer("TEMP?"), None);
        assert_eq!(c.answer("02BOOM").as_deref(), Some("ERR 1 UNKNOWN COMMAND"));
        let mut c = Controller::new(&["1".into(), "10".into()]);
        assert_eq!(c.answer("10SETP 5").as_deref(), Some("OK"));
        assert_eq!(c.setpoints()["10"], 5.0);
        assert_eq!(c.setpoints()["1"], INITIAL_SETPOINT);
    }
}
