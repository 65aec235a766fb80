//! The delivery lanes of one Observer: one FIFO lane per Thing, so a Thing's updates go out in
//! order and one at a time, while different Things' updates go out side by side (up to a bound).
//! A slow or failing destination for one Thing then holds up that Thing only. Pure: the task
//! starts and finishes the work the lanes hand it.
//!
//! Bounds, so that memory stays flat whatever the sink does:
//! - at most `max_running` lanes work at once (in-flight deliveries of the Observer);
//! - a lane holds at most `lane_capacity` waiting updates: under `Every` the oldest is dropped
//!   (and reported) when a new one comes to a full lane; under `Latest` a lane holds one, the
//!   newest (a replaced update was never going to be delivered);
//! - the task stops reading the state bus while `queued()` is at `total_capacity`, so a backlog
//!   beyond that stays in the bus's bounded ring, whose overflow the task already handles.

use std::collections::{HashMap, HashSet, VecDeque};

/// What happened to an offered update.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// Its lane was idle and a slot was free: start it now (the lane is now running).
    Start(T),
    /// It waits in its lane.
    Queued,
    /// It waits in its lane, and the lane's oldest waiting update was dropped to make room.
    Overflowed(T),
    /// It replaced the lane's waiting update (`Latest`), which is dropped.
    Replaced(T),
}

pub struct Lanes<T> {
    waiting: HashMap<String, VecDeque<T>>,
    running: HashSet<String>,
    /// Lanes with waiting work and no slot, in the order they asked: served round-robin.
    ready: VecDeque<String>,
    queued: usize,
    max_running: usize,
    lane_capacity: usize,
    total_capacity: usize,
}

impl<T> Lanes<T> {
    /// `lane_capacity` 1 keeps only the newest waiting update per lane (`Latest`).
    pub fn new(max_running: usize, lane_capacity: usize, total_capacity: usize) -> Self {
        Self {
            waiting: HashMap::new(),
            running: HashSet::new(),
            ready: VecDeque::new(),
            queued: 0,
            max_running: max_running.max(1),
            lane_capacity: lane_capacity.max(1),
            total_capacity: total_capacity.max(1),
        }
    }

    /// Updates waiting (not running) in all lanes.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Whether the task may take more updates from the bus.
    pub fn has_room(&self) -> bool {
        self.queued < self.total_capacity
    }

    /// Lanes working now.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Hands `item` to `lane`: to start now, or to wait behind the lane's earlier work.
    pub fn offer(&mut self, lane: &str, item: T) -> Offer<T> {
        if !self.running.contains(lane)
            && self.running.len() < self.max_running
            && self.waiting.get(lane).is_none_or(VecDeque::is_empty)
        {
            self.running.insert(lane.to_string());
            return Offer::Start(item);
        }
        let queue = self.waiting.entry(lane.to_string()).or_default();
        let dropped = if queue.len() >= self.lane_capacity {
            queue.pop_front()
        } else {
            None
        };
        let was_empty = queue.is_empty();
        queue.push_back(item);
        if dropped.is_none() {
            self.queued += 1;
        }
        if was_empty && !self.running.contains(lane) {
            self.ready.push_back(lane.to_string());
        }
        match dropped {
            Some(old) if self.lane_capacity == 1 => Offer::Replaced(old),
            Some(old) => Offer::Overflowed(old),
            None => Offer::Queued,
        }
    }

    /// `lane` finished its running item. Returns the work to start now, if any: the lane's own
    /// next update goes to the back of the line, so a busy Thing cannot starve the others.
    pub fn finish(&mut self, lane: &str) -> Option<(String, T)> {
        if self.running.remove(lane) && self.waiting.get(lane).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(lane.to_string());
        }
        self.next()
    }

    /// The next waiting update to start while a slot is free.
    pub fn next(&mut self) -> Option<(String, T)> {
        if self.running.len() >= self.max_running {
            return None;
        }
        while let Some(lane) = self.ready.pop_front() {
            let Some(queue) = self.waiting.get_mut(&lane) else {
                continue;
            };
            let Some(item) = queue.pop_front() else {
                self.waiting.remove(&lane);
                continue;
            };
            if queue.is_empty() {
                self.waiting.remove(&lane);
            }
            self.queued -= 1;
            self.running.insert(lane.clone());
            return Some((lane, item));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_runs_one_item_at_a_time_in_order() {
        let mut lanes = Lanes::new(8, 10, 100);
        assert_eq!(lanes.offer("a", 1), Offer::Start(1));
        assert_eq!(lanes.offer("a", 2), Offer::Queued);
        assert_eq!(lanes.offer("a", 3), Offer::Queued);
        assert_eq!(lanes.queued(), 2);
        assert_eq!(lanes.finish("a"), Some(("a".into(), 2)));
        assert_eq!(lanes.finish("a"), Some(("a".into(), 3)));
        assert_eq!(lanes.finish("a"), None);
        assert_eq!(lanes.running(), 0);
        assert_eq!(lanes.queued(), 0);
        // An idle lane starts at once again.
        assert_eq!(lanes.offer("a", 4), Offer::Start(4));
    }

    #[test]
    fn a_busy_lane_does_not_hold_up_another() {
        let mut lanes = Lanes::new(8, 10, 100);
        assert_eq!(lanes.offer("slow", 1), Offer::Start(1));
        assert_eq!(lanes.offer("slow", 2), Offer::Queued);
        assert_eq!(lanes.offer("fast", 10), Offer::Start(10));
        assert_eq!(lanes.finish("fast"), None);
        assert_eq!(lanes.offer("fast", 11), Offer::Start(11));
    }

    #[test]
    fn the_slot_bound_queues_new_lanes_and_serves_them_round_robin() {
        let mut lanes = Lanes::new(2, 10, 100);
        assert_eq!(lanes.offer("a", 1), Offer::Start(1));
        assert_eq!(lanes.offer("b", 1), Offer::Start(1));
        assert_eq!(lanes.offer("a", 2), Offer::Queued);
        assert_eq!(lanes.offer("c", 1), Offer::Queued);
        assert_eq!(lanes.running(), 2);
        // a finished: c asked for a slot before a's second item did.
        assert_eq!(lanes.finish("a"), Some(("c".into(), 1)));
        assert_eq!(lanes.finish("b"), Some(("a".into(), 2)));
        assert_eq!(lanes.finish("c"), None);
        assert_eq!(lanes.finish("a"), None);
        assert_eq!(lanes.running(), 0);
    }

    #[test]
    fn a_full_lane_drops_its_oldest_under_every_and_keeps_the_newest_under_latest() {
        let mut every = Lanes::new(1, 2, 100);
        assert_eq!(every.offer("a", 1), Offer::Start(1));
        assert_eq!(every.offer("a", 2), Offer::Queued);
        assert_eq!(every.offer("a", 3), Offer::Queued);
        assert_eq!(every.offer("a", 4), Offer::Overflowed(2));
        assert_eq!(every.queued(), 2);
        assert_eq!(every.finish("a"), Some(("a".into(), 3)));

        let mut latest = Lanes::new(1, 1, 100);
        assert_eq!(latest.offer("a", 1), Offer::Start(1));
        assert_eq!(latest.offer("a", 2), Offer::Queued);
        assert_eq!(latest.offer("a", 3), Offer::Replaced(2));
        assert_eq!(latest.queued(), 1);
        assert_eq!(latest.finish("a"), Some(("a".into(), 3)));
    }

    #[test]
    fn the_total_bound_says_when_to_stop_reading() {
        let mut lanes = Lanes::new(1, 10, 2);
        assert_eq!(lanes.offer("a", 1), Offer::Start(1));
        assert!(lanes.has_room());
        lanes.offer("a", 2);
        lanes.offer("b", 1);
        assert!(!lanes.has_room());
        assert_eq!(lanes.finish("a"), Some(("b".into(), 1)));
        assert!(lanes.has_room());
        assert_eq!(lanes.finish("b"), Some(("a".into(), 2)));
        assert_eq!(lanes.finish("a"), None);
    }
}
