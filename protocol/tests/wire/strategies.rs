//! proptest strategies for arbitrary valid frames. Sizes stay small so that
//! 10,000 cases per property run in seconds in a debug build.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use tidings_protocol::*;

/// Short strings: mostly topic-like ASCII, with multi-byte UTF-8 (2, 3 and 4 bytes
/// per char) mixed in so that lengths are byte counts, not char counts.
pub fn text() -> impl Strategy<Value = Text> {
    const CHARS: &[char] = &[
        'a',
        'b',
        'z',
        '.',
        '*',
        '>',
        ' ',
        '\u{e9}',
        '\u{5b57}',
        '\u{1f600}',
    ];
    vec(proptest::sample::select(CHARS), 0..8)
        .prop_map(|chars| Text::from(String::from_iter(chars)))
}

/// A small payload.
pub fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

/// A short header list.
pub fn headers() -> impl Strategy<Value = Headers> {
    vec((text(), text()), 0..3)
}

fn publish() -> impl Strategy<Value = Publish> {
    (
        option::of(any::<u32>()),
        any::<bool>(),
        any::<bool>(),
        text(),
        option::of(text()),
        option::of(text()),
        option::of(any::<u64>()),
        headers(),
        payload(),
    )
        .prop_map(
            |(
                request_id,
                confirm,
                check,
                topic,
                reply_to,
                message_id,
                delay_ms,
                headers,
                payload,
            )| {
                // confirm and check_responders need a request id on the wire.
                let wants_id = confirm || check;
                Publish {
                    request_id: if wants_id {
                        Some(request_id.unwrap_or(1))
                    } else {
                        request_id
                    },
                    confirm,
                    check_responders: check,
                    topic,
                    reply_to,
                    message_id,
                    delay_ms,
                    headers,
                    payload,
                }
            },
        )
}

fn overflow() -> impl Strategy<Value = Overflow> {
    prop_oneof![Just(Overflow::RejectPublish), Just(Overflow::DropHead)]
}

fn queue_options() -> impl Strategy<Value = QueueOptions> {
    (
        vec(text(), 0..3),
        option::of(any::<u32>()),
        option::of(any::<u64>()),
        option::of(vec(any::<u64>(), 0..3)),
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        option::of(overflow()),
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        option::of(text()),
    )
        .prop_map(
            |(bindings, md, ack, backoff, len, bytes, of, ttl, dedup, dl)| QueueOptions {
                bindings,
                max_deliveries: md,
                ack_timeout_ms: ack,
                backoff_ms: backoff,
                max_length: len,
                max_bytes: bytes,
                overflow: of,
                ttl_ms: ttl,
                dedup_window_ms: dedup,
                dead_letter: dl,
            },
        )
}

fn queue_info() -> impl Strategy<Value = QueueInfo> {
    (text(), vec(text(), 0..2), any::<[u64; 11]>(), any::<u32>()).prop_map(
        |(name, bindings, n, consumers)| QueueInfo {
            name,
            bindings,
            depth: n[0],
            bytes: n[1],
            in_flight: n[2],
            delayed: n[3],
            consumers,
            dead_lettered: n[4],
            published: n[5],
            delivered: n[6],
            acked: n[7],
            publish_rate: n[8],
            deliver_rate: n[9],
            ack_rate: n[10],
        },
    )
}

fn dead_letter() -> impl Strategy<Value = DeadLetter> {
    (
        any::<u64>(),
        text(),
        any::<u32>(),
        text(),
        headers(),
        payload(),
    )
        .prop_map(
            |(id, topic, attempts, reason, headers, payload)| DeadLetter {
                id,
                topic,
                attempts,
                reason,
                headers,
                payload,
            },
        )
}

fn session_frames() -> BoxedStrategy<Frame> {
    prop_oneof![
        (
            any::<u16>(),
            text(),
            option::of(text()),
            option::of(text()),
            option::of(any::<u16>())
        )
            .prop_map(|(version, client_name, token, user, minor)| {
                Frame::from(Hello {
                    version,
                    client_name,
                    token,
                    user,
                    minor,
                })
            }),
        (
            any::<u16>(),
            text(),
            any::<[u32; 3]>(),
            option::of(any::<u16>()),
            option::of(any::<u32>()),
        )
            .prop_map(|(version, sv, n, minor, max_credit)| {
                Frame::from(Welcome {
                    minor,
                    max_credit,
                    version,
                    server_version: sv,
                    max_frame_len: n[0],
                    max_payload: n[1],
                    heartbeat_ms: n[2],
                })
            }),
        Just(Frame::Ping(Ping)),
        Just(Frame::Pong(Pong)),
        any::<u32>().prop_map(|request_id| Frame::from(Stats { request_id })),
        any::<u32>().prop_map(|request_id| Frame::from(OkReply { request_id })),
        (any::<u32>(), any::<u16>(), text()).prop_map(|(request_id, code, message)| {
            Frame::from(ErrorReply {
                request_id,
                code,
                message,
            })
        }),
        (any::<u32>(), vec((text(), any::<u64>()), 0..3)).prop_map(|(request_id, entries)| {
            Frame::from(StatsReply {
                request_id,
                entries,
            })
        }),
    ]
    .boxed()
}

fn messaging_frames() -> BoxedStrategy<Frame> {
    prop_oneof![
        publish().prop_map(Frame::from),
        (any::<u32>(), any::<u32>(), text(), option::of(text())).prop_map(
            |(request_id, sid, pattern, group)| {
                Frame::from(Subscribe {
                    request_id,
                    sid,
                    pattern,
                    group,
                })
            }
        ),
        (any::<u32>(), any::<u32>())
            .prop_map(|(request_id, sid)| Frame::from(Unsubscribe { request_id, sid })),
        (
            any::<u32>(),
            text(),
            option::of(text()),
            option::of(text()),
            headers(),
            payload()
        )
            .prop_map(|(sid, topic, reply_to, message_id, headers, payload)| {
                Frame::from(Message {
                    message_id,
                    sid,
                    topic,
                    reply_to,
                    headers,
                    payload,
                })
            }),
    ]
    .boxed()
}

fn queue_admin_frames() -> BoxedStrategy<Frame> {
    prop_oneof![
        (any::<u32>(), text(), queue_options()).prop_map(|(request_id, name, options)| {
            Frame::from(QueueDeclare {
                request_id,
                name,
                options,
            })
        }),
        (any::<u32>(), text())
            .prop_map(|(request_id, name)| Frame::from(QueueDelete { request_id, name })),
        (any::<u32>(), text(), text()).prop_map(|(request_id, name, pattern)| {
            Frame::from(QueueBind {
                request_id,
                name,
                pattern,
            })
        }),
        (any::<u32>(), text(), text()).prop_map(|(request_id, name, pattern)| {
            Frame::from(QueueUnbind {
                request_id,
                name,
                pattern,
            })
        }),
        (any::<u32>(), text())
            .prop_map(|(request_id, name)| Frame::from(QueueInfoRequest { request_id, name })),
        any::<u32>().prop_map(|request_id| Frame::from(QueueList { request_id })),
        (any::<u32>(), text(), any::<u32>()).prop_map(|(request_id, queue, limit)| {
            Frame::from(DeadLetters {
                request_id,
                queue,
                limit,
                from: (limit % 2 == 1).then_some(u64::from(request_id) << 8),
            })
        }),
        (any::<u32>(), text(), any::<u32>()).prop_map(|(request_id, queue, limit)| {
            Frame::from(Redrive {
                request_id,
                queue,
                limit,
            })
        }),
    ]
    .boxed()
}

fn queue_data_frames() -> BoxedStrategy<Frame> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            text(),
            any::<u32>(),
            option::of(any::<u32>())
        )
            .prop_map(|(request_id, consumer_id, queue, credit, limit)| {
                Frame::from(Consume {
                    limit,
                    request_id,
                    consumer_id,
                    queue,
                    credit,
                })
            }),
        (any::<u32>(), any::<u32>()).prop_map(|(request_id, consumer_id)| Frame::from(Cancel {
            request_id,
            consumer_id
        })),
        (any::<u32>(), any::<u32>()).prop_map(|(consumer_id, credit)| Frame::from(Credit {
            consumer_id,
            credit
        })),
        (
            any::<(u32, u64, u32)>(),
            (text(), text()),
            (option::of(text()), option::of(text())),
            headers(),
            payload()
        )
            .prop_map(
                |(
                    (consumer_id, delivery_id, attempt),
                    (queue, topic),
                    (reply_to, message_id),
                    headers,
                    payload,
                )| {
                    Frame::from(Delivery {
                        reply_to,
                        message_id,
                        consumer_id,
                        delivery_id,
                        attempt,
                        queue,
                        topic,
                        headers,
                        payload,
                    })
                }
            ),
        (any::<u32>(), any::<u8>(), text()).prop_map(|(consumer_id, reason, message)| {
            Frame::from(ConsumerCancelled {
                consumer_id,
                reason,
                message,
            })
        }),
        (any::<u32>(), vec(any::<u64>(), 0..4))
            .prop_map(|(request_id, ids)| Frame::from(Ack { request_id, ids })),
        (
            any::<u32>(),
            option::of(any::<u64>()),
            vec(any::<u64>(), 0..4)
        )
            .prop_map(|(request_id, delay_ms, ids)| Frame::from(Nack {
                request_id,
                delay_ms,
                ids
            })),
        (any::<(u32, u32, u32)>(), any::<bool>()).prop_map(
            |((request_id, queues, rejected), duplicate)| {
                Frame::from(Confirm {
                    request_id,
                    queues,
                    rejected,
                    duplicate,
                })
            }
        ),
    ]
    .boxed()
}

fn queue_reply_frames() -> BoxedStrategy<Frame> {
    prop_oneof![
        (any::<u32>(), queue_info(), option::of(queue_options())).prop_map(
            |(request_id, info, options)| Frame::from(QueueInfoReply {
                request_id,
                info,
                options: options.map(Box::new)
            })
        ),
        (any::<u32>(), vec(queue_info(), 0..2))
            .prop_map(|(request_id, queues)| Frame::from(QueueListReply { request_id, queues })),
        (any::<u32>(), vec(dead_letter(), 0..2)).prop_map(|(request_id, letters)| {
            Frame::from(DeadLettersReply {
                request_id,
                next: (request_id % 2 == 1).then_some(u64::from(request_id)),
                letters,
            })
        }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(request_id, moved)| Frame::from(RedriveReply { request_id, moved })),
    ]
    .boxed()
}

/// Any valid frame of any type, weighted so each of the 32 types is drawn about
/// equally often.
pub fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        8 => session_frames(),
        4 => messaging_frames(),
        8 => queue_admin_frames(),
        8 => queue_data_frames(),
        4 => queue_reply_frames(),
    ]
}
