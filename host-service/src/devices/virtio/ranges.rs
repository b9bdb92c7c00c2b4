//! A coalescing set of half-open `u64` ranges: the sectors a disk's guest wrote, the bytes of a
//! disk that checkpoints still protect, the frames a balloon's guest hinted free. Touching and overlapping ranges merge, so the set stays as small
//! as the ranges are scattered.

use std::collections::BTreeMap;

/// Half-open ranges `[start, end)`, keyed by start, valued by end, never touching each other
/// (the map is open to the crate for users that also split ranges, like copy before write).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet(pub(crate) BTreeMap<u64, u64>);

impl RangeSet {
    /// Adds `[start, end)`, merging it with every range it overlaps or touches; an empty range
    /// is ignored.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Absorb every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// The ranges as `(start, end)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    /// How many separate ranges the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The total length of all ranges.
    pub fn total(&self) -> u64 {
        self.iter().map(|(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        let mut set = RangeSet::default();
        set.insert(10, 12);
        set.insert(12, 13);
        set.insert(40, 41);
        set.insert(5, 5);
        assert_eq!(set.iter().collect::<Vec<_>>(), [(10, 13), (40, 41)]);
        set.insert(0, 50);
        assert_eq!(set.iter().collect::<Vec<_>>(), [(0, 50)]);
        assert_eq!((set.len(), set.total()), (1, 50));
        assert!(!set.is_empty());
    }
}
