//! Line and column of any node in a YAML file, by its path (`inverters[3].unit_id`).
//!
//! serde tells us where a field has the wrong type, but a rule that spans several nodes
//! (two inverters with the same unit id) is checked after parsing, on plain structs. This
//! map lets those checks point at the node they are about.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

impl From<&str> for PathSeg {
    fn from(s: &str) -> Self {
        PathSeg::Key(s.to_string())
    }
}

impl From<usize> for PathSeg {
    fn from(i: usize) -> Self {
        PathSeg::Index(i)
    }
}

/// Build a path from keys and indexes: `path!["inverters", 3, "unit_id"]`.
#[macro_export]
macro_rules! path {
    ($($seg:expr),* $(,)?) => {
        vec![$($crate::config::PathSeg::from($seg)),*]
    };
}

#[derive(Debug, Default)]
pub struct Locator {
    nodes: HashMap<Vec<PathSeg>, (usize, usize)>,
}

enum Frame {
    Map { key: Option<String> },
    Seq { next: usize },
}

struct Walker {
    stack: Vec<Frame>,
    path: Vec<PathSeg>,
    nodes: HashMap<Vec<PathSeg>, (usize, usize)>,
}

impl Walker {
    /// Where the next node goes; `None` if it is a mapping key.
    fn next_path(&mut self) -> Option<Vec<PathSeg>> {
        match self.stack.last_mut() {
            None => Some(Vec::new()),
            Some(Frame::Seq { next }) => {
                let mut p = self.path.clone();
                p.push(PathSeg::Index(*next));
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { key: Some(k) }) => {
                let mut p = self.path.clone();
                p.push(PathSeg::Key(k.clone()));
                Some(p)
            }
            Some(Frame::Map { key: None }) => None,
        }
    }

    fn after_value(&mut self) {
        if let Some(Frame::Map { key }) = self.stack.last_mut() {
            *key = None;
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => match self.next_path() {
                Some(p) => {
                    self.nodes.entry(p).or_insert(at);
                    self.after_value();
                }
                None => {
                    // A block mapping's start mark sits past its indentation; its first
                    // key is where a reader looks for it.
                    self.nodes.entry(self.path.clone()).or_insert(at);
                    if let Some(Frame::Map { key }) = self.stack.last_mut() {
                        *key = Some(value);
                    }
                }
            },
            Event::Alias(_) => {
                if let Some(p) = self.next_path() {
                    self.nodes.entry(p).or_insert(at);
                }
                self.after_value();
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let p = self.next_path().unwrap_or_else(|| self.path.clone());
                self.path = p;
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { key: None }
                } else {
                    self.nodes.entry(self.path.clone()).or_insert(at);
                    Frame::Seq { next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.nodes.entry(self.path.clone()).or_insert(at);
                self.stack.pop();
                self.path.pop();
                self.after_value();
            }
            _ => {}
        }
    }
}

impl Locator {
    /// Index every node of the text. A text that does not parse yields an empty map;
    /// serde reports the syntax error with its own position first.
    pub fn new(text: &str) -> Locator {
        let mut walker = Walker {
            stack: Vec::new(),
            path: Vec::new(),
            nodes: HashMap::new(),
        };
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut walker, false);
        Locator {
            nodes: walker.nodes,
        }
    }

    /// `(line, col)` of the node at `path`, or of its nearest ancestor that exists
    /// (a missing field is reported at the mapping that lacks it).
    pub fn locate(&self, path: &[PathSeg]) -> (usize, usize) {
        for len in (0..=path.len()).rev() {
            if let Some(at) = self.nodes.get(&path[..len]) {
                return *at;
            }
        }
        (1, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // `path!` builds the Vec the validators pass around.
    #[allow(clippy::useless_vec)]
    fn locates_nested_nodes_and_falls_back_to_parents() {
        let text = "site:\n  name: x\nlist:\n  - a: 1\n    b: 2\n  - a: 3\n";
        let loc = Locator::new(text);
        assert_eq!(loc.locate(&crate::path!["site", "name"]), (2, 9));
        assert_eq!(loc.locate(&crate::path!["list", 1, "a"]), (6, 8));
        assert_eq!(loc.locate(&crate::path!["list", 0, "b"]), (5, 8));
        // A missing field points at its mapping.
        assert_eq!(loc.locate(&crate::path!["list", 1, "zz"]), (6, 5));
    }
}
