// outbox-relay browser client: listen on the logged-in user's own channel.
//
//   import { subscribePusher } from "/static/outbox_relay/client.js";
//   const sub = subscribePusher(pusher, { channel: "private-user-42", onMessage, onResync });
//
// Works with a pusher-js `Pusher` or an ably-js `Realtime` object that the page
// already built (this module loads no library itself). It adds what the
// libraries leave to the app:
//  - de-duplication: the relay delivers exactly once per channel except in one
//    rare window (a crash between the provider's acceptance and the ledger write,
//    see docs/design.md), so the same notification may arrive twice. Each message
//    is keyed by the delivery: Ably's message id (the relay's idempotency key),
//    or for Pusher, which passes no id, the payload's `event_id` (set by
//    `notify()`) or `id` (a routed row's primary key).
//  - reconnection: a failed channel authorization (an expired session, a server
//    restart) is retried with capped exponential back-off instead of leaving the
//    page deaf; a connection the library gave up on is restarted the same way.
//  - resync: when the connection comes back after a loss (Pusher keeps no
//    history; Ably says when continuity was lost), `onResync` is called so the
//    page can reload its notification list for what it missed.

const DEFAULTS = { initialDelayMs: 1000, maxDelayMs: 30000, remember: 1000 };

/** A bounded set of the delivery keys already handed to the page. */
export class Seen {
  constructor(limit = DEFAULTS.remember) {
    this.limit = limit;
    this.keys = new Set();
  }
  /** True the first time `key` is offered; false for a repeat. Null keys always pass. */
  first(key) {
    if (key === undefined || key === null) return true;
    const k = String(key);
    if (this.keys.has(k)) return false;
    this.keys.add(k);
    if (this.keys.size > this.limit) {
      // Sets iterate in insertion order: drop the oldest.
      this.keys.delete(this.keys.values().next().value);
    }
    return true;
  }
}

/** Delays 1 s, 2 s, 4 s ... capped; `reset()` after a success. */
export class Backoff {
  constructor({ initialDelayMs, maxDelayMs, setTimer, clearTimer }) {
    this.initial = initialDelayMs;
    this.max = maxDelayMs;
    this.attempt = 0;
    this.timer = null;
    this.setTimer = setTimer;
    this.clearTimer = clearTimer;
  }
  schedule(fn) {
    if (this.timer !== null) return; // one retry pending at a time
    const delay = Math.min(this.max, this.initial * 2 ** this.attempt);
    this.attempt += 1;
    this.timer = this.setTimer(() => {
      this.timer = null;
      fn();
    }, delay);
  }
  reset() {
    this.attempt = 0;
  }
  cancel() {
    if (this.timer !== null) this.clearTimer(this.timer);
    this.timer = null;
  }
}

function options(opts) {
  const o = { ...DEFAULTS, ...opts };
  if (!o.channel) throw new Error("outbox_relay: `channel` is required (e.g. private-user-42)");
  if (typeof o.onMessage !== "function") throw new Error("outbox_relay: `onMessage(event, data)` is required");
  o.onResync = o.onResync || (() => {});
  o.setTimer = o.setTimer || ((fn, ms) => setTimeout(fn, ms));
  o.clearTimer = o.clearTimer || ((t) => clearTimeout(t));
  return o;
}

/** Pusher: the payload's `event_id` (from notify()), else its `id` (a routed row's key). */
export function pusherKey(eventName, data) {
  if (data && typeof data === "object") {
    if (data.event_id !== undefined) return `${eventName}:${data.event_id}`;
    if (data.id !== undefined) return `${eventName}:${data.id}`;
  }
  return null;
}

/**
 * Subscribes a pusher-js client to `opts.channel`.
 * opts: { channel, onMessage(event, data), onResync?(), events?: [names], initialDelayMs?, maxDelayMs? }
 * Returns { close() }.
 */
export function subscribePusher(pusher, opts) {
  const o = options(opts);
  const seen = new Seen(o.remember);
  const retry = new Backoff(o);
  let channel = null;
  let wasConnected = false;
  let closed = false;

  const onEvent = (eventName, data) => {
    // pusher: and pusher_internal: events are the protocol's own, not notifications.
    if (eventName.startsWith("pusher:") || eventName.startsWith("pusher_internal:")) return;
    if (o.events && !o.events.includes(eventName)) return;
    if (seen.first(pusherKey(eventName, data))) o.onMessage(eventName, data);
  };
  const onSubscribed = () => retry.reset();
  const onSubscriptionError = () => {
    // pusher-js does not retry a refused authorization on its own.
    retry.schedule(() => {
      if (closed) return;
      detach();
      attach();
    });
  };
  const attach = () => {
    channel = pusher.subscribe(o.channel);
    channel.bind_global(onEvent);
    channel.bind("pusher:subscription_succeeded", onSubscribed);
    channel.bind("pusher:subscription_error", onSubscriptionError);
  };
  const detach = () => {
    if (!channel) return;
    channel.unbind_global(onEvent);
    channel.unbind("pusher:subscription_succeeded", onSubscribed);
    channel.unbind("pusher:subscription_error", onSubscriptionError);
    pusher.unsubscribe(o.channel);
    channel = null;
  };
  const onStateChange = ({ current }) => {
    if (closed) return;
    if (current === "connected") {
      // Events published while the socket was down are gone for good with Pusher.
      if (wasConnected) o.onResync();
      wasConnected = true;
      retry.reset();
    } else if (current === "failed" || current === "unavailable") {
      retry.schedule(() => closed || pusher.connect());
    }
  };

  pusher.connection.bind("state_change", onStateChange);
  if (pusher.connection.state === "connected") wasConnected = true;
  attach();
  return {
    close() {
      closed = true;
      retry.cancel();
      pusher.connection.unbind("state_change", onStateChange);
      detach();
    },
  };
}

/**
 * Subscribes an ably-js Realtime client to `opts.channel` (same options as subscribePusher).
 * De-duplicates on the message id, which the relay sets to the delivery's idempotency key.
 */
export function subscribeAbly(realtime, opts) {
  const o = options(opts);
  const seen = new Seen(o.remember);
  const retry = new Backoff(o);
  const channel = realtime.channels.get(o.channel);
  let attachedBefore = false;
  let closed = false;

  const onMessage = (message) => {
    if (o.events && !o.events.includes(message.name)) return;
    if (seen.first(message.id)) o.onMessage(message.name, message.data);
  };
  const onChannelState = (change) => {
    if (closed) return;
    if (change.current === "attached") {
      retry.reset();
      // resumed=false on a re-attach: Ably could not guarantee continuity.
      if (attachedBefore && change.resumed === false) o.onResync();
      attachedBefore = true;
    } else if (change.current === "failed" || change.current === "suspended") {
      retry.schedule(() => closed || Promise.resolve(channel.attach()).catch(() => {}));
    }
  };
  const onConnectionState = (change) => {
    if (closed) return;
    if (change.current === "connected") retry.reset();
    else if (change.current === "failed" || change.current === "suspended") {
      retry.schedule(() => closed || realtime.connect());
    }
  };

  channel.on(onChannelState);
  realtime.connection.on(onConnectionState);
  // ably-js 2 returns a promise (rejected when authorization is refused);
  // the channel's state events above drive the retry either way.
  Promise.resolve(channel.subscribe(onMessage)).catch(() => {});
  return {
    close() {
      closed = true;
      retry.cancel();
      channel.off(onChannelState);
      realtime.connection.off(onConnectionState);
      channel.unsubscribe(onMessage);
    },
  };
}
