//! What a sender is told about its message, and when: an HTTP answer or an MQTT
//! acknowledgement is given only once what the message caused is durable (written into the
//! Thing), or the message was refused for good. Until then the sender still holds the message:
//! an HTTP caller waits (or gets 503 and may retry), an unacknowledged MQTT QoS 1/2 message is
//! redelivered by the broker to the operator's persistent session after a crash or reconnect.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use tokio::sync::oneshot;

use super::message::Rejection;

/// The acknowledgement of one MQTT message, shared by every Subscriber it was routed to: it is
/// sent when the last of them settled it, and never if one of them gave it up (its task ended
/// before writing it), so the broker redelivers it.
pub struct SharedAck {
    shared: Arc<AckState>,
    settled: bool,
}

struct AckState {
    send: Box<dyn Fn() + Send + Sync>,
    outstanding: AtomicUsize,
    abandoned: AtomicBool,
}

impl SharedAck {
    /// One holder per Subscriber the message goes to; `send` acknowledges it to the broker.
    pub fn split(holders: usize, send: Box<dyn Fn() + Send + Sync>) -> Vec<SharedAck> {
        let shared = Arc::new(AckState {
            send,
            outstanding: AtomicUsize::new(holders),
            abandoned: AtomicBool::new(false),
        });
        (0..holders)
            .map(|_| SharedAck {
                shared: shared.clone(),
                settled: false,
            })
            .collect()
    }

    fn release(&self) {
        if self.shared.outstanding.fetch_sub(1, Ordering::AcqRel) == 1
            && !self.shared.abandoned.load(Ordering::Acquire)
        {
            (self.shared.send)();
        }
    }

    fn settle(mut self) {
        self.settled = true;
        self.release();
    }
}

impl Drop for SharedAck {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.abandoned.store(true, Ordering::Release);
            self.release();
        }
    }
}

/// Whom to tell about a message.
pub enum Receipt {
    /// Nobody (MQTT QoS 0).
    None,
    /// An HTTP caller waiting for the verdict.
    Http(oneshot::Sender<Result<(), Rejection>>),
    Mqtt(SharedAck),
}

impl Receipt {
    /// The message was written, or refused for good (`Err`): the sender may forget it. A
    /// refused MQTT message is acknowledged too: redelivering it cannot change the verdict.
    pub fn settle(self, verdict: Result<(), Rejection>) {
        match self {
            Receipt::None => {}
            Receipt::Http(reply) => {
                let _ = reply.send(verdict);
            }
            Receipt::Mqtt(ack) => ack.settle(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting() -> (Arc<AtomicUsize>, Box<dyn Fn() + Send + Sync>) {
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = sent.clone();
        (
            sent,
            Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    #[test]
    fn a_message_is_acknowledged_once_every_subscriber_settled_it() {
        let (sent, send) = counting();
        let mut holders = SharedAck::split(2, send);
        let second = holders.pop().unwrap();
        let first = holders.pop().unwrap();
        Receipt::Mqtt(first).settle(Ok(()));
        assert_eq!(
            sent.load(Ordering::SeqCst),
            0,
            "one Subscriber still holds it"
        );
        Receipt::Mqtt(second).settle(Err(Rejection::NotObject));
        assert_eq!(sent.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_message_given_up_by_one_subscriber_is_never_acknowledged() {
        let (sent, send) = counting();
        let mut holders = SharedAck::split(2, send);
        drop(holders.pop());
        Receipt::Mqtt(holders.pop().unwrap()).settle(Ok(()));
        assert_eq!(
            sent.load(Ordering::SeqCst),
            0,
            "the broker must redeliver it"
        );
    }
}
