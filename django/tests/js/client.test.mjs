// Tests of static/outbox_relay/client.js under Node's test runner, against
// in-memory stand-ins for the parts of pusher-js and ably-js the module uses.
// Run by tests/test_js.py (CLIENT_JS names the module).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

// client.js is a browser ES module with a .js name; a data: URL imports it as ESM.
const source = readFileSync(process.env.CLIENT_JS, "utf8");
const client = await import("data:text/javascript;base64," + Buffer.from(source).toString("base64"));

/** Timers run by hand: `clock.advance(ms)`. */
function manualClock() {
  let now = 0;
  let pending = [];
  return {
    setTimer(fn, ms) {
      const t = { at: now + ms, fn, ms };
      pending.push(t);
      return t;
    },
    clearTimer(t) {
      pending = pending.filter((p) => p !== t);
    },
    advance(ms) {
      now += ms;
      const due = pending.filter((p) => p.at <= now);
      pending = pending.filter((p) => p.at > now);
      due.forEach((p) => p.fn());
    },
    delays: () => pending.map((p) => p.ms),
    pending: () => pending.length,
  };
}

class Emitter {
  constructor() {
    this.handlers = new Map();
  }
  bind(name, fn) {
    if (!this.handlers.has(name)) this.handlers.set(name, []);
    this.handlers.get(name).push(fn);
  }
  unbind(name, fn) {
    this.handlers.set(name, (this.handlers.get(name) || []).filter((h) => h !== fn));
  }
  emit(name, ...args) {
    (this.handlers.get(name) || []).forEach((h) => h(...args));
  }
}

function fakePusher() {
  const subscriptions = [];
  const pusher = {
    connection: Object.assign(new Emitter(), { state: "connecting" }),
    connects: 0,
    unsubscribed: [],
    subscribe(name) {
      const ch = new Emitter();
      ch.name = name;
      ch.globals = [];
      ch.bind_global = (fn) => ch.globals.push(fn);
      ch.unbind_global = (fn) => (ch.globals = ch.globals.filter((g) => g !== fn));
      ch.send = (event, data) => ch.globals.forEach((g) => g(event, data));
      subscriptions.push(ch);
      return ch;
    },
    unsubscribe(name) {
      pusher.unsubscribed.push(name);
    },
    connect() {
      pusher.connects += 1;
    },
    subscriptions,
    current: () => subscriptions[subscriptions.length - 1],
    state(previous, current) {
      pusher.connection.state = current;
      pusher.connection.emit("state_change", { previous, current });
    },
  };
  return pusher;
}

function collector() {
  const got = [];
  let resyncs = 0;
  return {
    got,
    resyncs: () => resyncs,
    opts: (extra = {}) => ({
      channel: "private-user-42",
      onMessage: (event, data) => got.push([event, data]),
      onResync: () => (resyncs += 1),
      ...extra,
    }),
  };
}

test("Pusher: a re-sent notification reaches the page once", () => {
  const pusher = fakePusher();
  const c = collector();
  client.subscribePusher(pusher, c.opts());
  const ch = pusher.current();
  assert.equal(ch.name, "private-user-42");
  ch.send("order_shipped", { event_id: "a", title: "t" });
  ch.send("order_shipped", { event_id: "a", title: "t" }); // the relay's rare re-send
  ch.send("order_shipped", { event_id: "b", title: "u" });
  ch.send("notification_created", { id: 7 }); // a routed row: its primary key
  ch.send("notification_created", { id: 7 });
  ch.send("pusher:subscription_succeeded", {}); // the protocol's own events are not notifications
  ch.send("plain", "no id"); // nothing to key on: passed through
  ch.send("plain", "no id");
  assert.deepEqual(
    c.got.map(([e, d]) => [e, d.event_id ?? d.id ?? d]),
    [
      ["order_shipped", "a"],
      ["order_shipped", "b"],
      ["notification_created", 7],
      ["plain", "no id"],
      ["plain", "no id"],
    ],
  );
});

test("Pusher: only the listed events when `events` is given", () => {
  const pusher = fakePusher();
  const c = collector();
  client.subscribePusher(pusher, c.opts({ events: ["order_shipped"] }));
  pusher.current().send("other", { event_id: "x" });
  pusher.current().send("order_shipped", { event_id: "y" });
  assert.deepEqual(c.got.map(([e]) => e), ["order_shipped"]);
});

test("Pusher: a refused authorization is retried with doubling, capped delays", () => {
  const pusher = fakePusher();
  const clock = manualClock();
  const c = collector();
  client.subscribePusher(pusher, c.opts({ ...clock, initialDelayMs: 1000, maxDelayMs: 4000 }));
  const seen = [];
  for (let i = 0; i < 4; i++) {
    pusher.current().emit("pusher:subscription_error", { status: 403 });
    seen.push(clock.delays()[0]);
    clock.advance(seen[i]);
  }
  assert.deepEqual(seen, [1000, 2000, 4000, 4000]);
  assert.equal(pusher.subscriptions.length, 5); // the first and four retries
  assert.equal(pusher.unsubscribed.length, 4); // each failed one released first
  // Messages still flow on the latest subscription, and a success resets the delay.
  pusher.current().send("order_shipped", { event_id: "z" });
  assert.equal(c.got.length, 1);
  pusher.current().emit("pusher:subscription_succeeded");
  pusher.current().emit("pusher:subscription_error", { status: 500 });
  assert.deepEqual(clock.delays(), [1000]);
});

test("Pusher: a lost connection is restarted and the page told to resync", () => {
  const pusher = fakePusher();
  const clock = manualClock();
  const c = collector();
  client.subscribePusher(pusher, c.opts(clock));
  pusher.state("connecting", "connected");
  assert.equal(c.resyncs(), 0); // the first connection is not a resync
  pusher.state("connected", "unavailable");
  assert.equal(pusher.connects, 0);
  clock.advance(1000);
  assert.equal(pusher.connects, 1);
  pusher.state("unavailable", "connected");
  assert.equal(c.resyncs(), 1);
});

test("Pusher: close() stops everything", () => {
  const pusher = fakePusher();
  const clock = manualClock();
  const c = collector();
  const sub = client.subscribePusher(pusher, c.opts(clock));
  const ch = pusher.current();
  ch.emit("pusher:subscription_error", { status: 403 });
  sub.close();
  assert.equal(clock.pending(), 0);
  ch.send("order_shipped", { event_id: "late" });
  pusher.state("connecting", "connected");
  assert.equal(c.got.length, 0);
  assert.deepEqual(pusher.unsubscribed, ["private-user-42"]);
});

function fakeAbly() {
  const channel = {
    listeners: [],
    states: [],
    attaches: 0,
    on(fn) {
      this.states.push(fn);
    },
    off(fn) {
      this.states = this.states.filter((s) => s !== fn);
    },
    subscribe(fn) {
      this.listeners.push(fn);
      return Promise.resolve();
    },
    unsubscribe(fn) {
      this.listeners = this.listeners.filter((l) => l !== fn);
    },
    attach() {
      this.attaches += 1;
      return Promise.resolve();
    },
    send(message) {
      this.listeners.forEach((l) => l(message));
    },
    state(change) {
      this.states.forEach((s) => s(change));
    },
  };
  const realtime = {
    names: [],
    connects: 0,
    channels: {
      get(name) {
        realtime.names.push(name);
        return channel;
      },
    },
    connection: {
      fns: [],
      on(fn) {
        this.fns.push(fn);
      },
      off(fn) {
        this.fns = this.fns.filter((f) => f !== fn);
      },
      state(change) {
        this.fns.forEach((f) => f(change));
      },
    },
    connect() {
      realtime.connects += 1;
    },
  };
  return { realtime, channel };
}

test("Ably: de-duplicates on the message id (the relay's idempotency key)", () => {
  const { realtime, channel } = fakeAbly();
  const c = collector();
  client.subscribeAbly(realtime, c.opts());
  assert.deepEqual(realtime.names, ["private-user-42"]);
  channel.send({ id: "k1", name: "order_shipped", data: { title: "t" } });
  channel.send({ id: "k1", name: "order_shipped", data: { title: "t" } });
  channel.send({ id: "k2", name: "order_shipped", data: { title: "u" } });
  assert.deepEqual(c.got, [
    ["order_shipped", { title: "t" }],
    ["order_shipped", { title: "u" }],
  ]);
});

test("Ably: re-attaches a suspended channel, reconnects a failed connection, resyncs on lost continuity", () => {
  const { realtime, channel } = fakeAbly();
  const clock = manualClock();
  const c = collector();
  client.subscribeAbly(realtime, c.opts(clock));
  channel.state({ previous: "attaching", current: "attached", resumed: false });
  assert.equal(c.resyncs(), 0); // first attach
  channel.state({ previous: "attached", current: "suspended" });
  clock.advance(1000);
  assert.equal(channel.attaches, 1);
  channel.state({ previous: "attaching", current: "attached", resumed: true });
  assert.equal(c.resyncs(), 0); // continuity kept: nothing missed
  channel.state({ previous: "attaching", current: "attached", resumed: false });
  assert.equal(c.resyncs(), 1);
  realtime.connection.state({ previous: "connected", current: "failed" });
  clock.advance(1000);
  assert.equal(realtime.connects, 1);
});

test("Ably: close() unsubscribes and cancels retries", () => {
  const { realtime, channel } = fakeAbly();
  const clock = manualClock();
  const c = collector();
  const sub = client.subscribeAbly(realtime, c.opts(clock));
  channel.state({ previous: "attached", current: "failed" });
  sub.close();
  assert.equal(clock.pending(), 0);
  channel.send({ id: "k", name: "e", data: {} });
  assert.equal(c.got.length, 0);
  assert.equal(channel.listeners.length, 0);
});

test("Seen forgets the oldest keys past its limit", () => {
  const seen = new client.Seen(2);
  assert.equal(seen.first("a"), true);
  assert.equal(seen.first("b"), true);
  assert.equal(seen.first("a"), false);
  assert.equal(seen.first("c"), true); // "a" is forgotten now
  assert.equal(seen.first("a"), true);
  assert.equal(seen.first(null), true);
});

test("options are checked", () => {
  assert.throws(() => client.subscribePusher(fakePusher(), { onMessage() {} }), /channel/);
  assert.throws(() => client.subscribePusher(fakePusher(), { channel: "x" }), /onMessage/);
});

test("default back-off: 1 s doubling up to 30 s", () => {
  const pusher = fakePusher();
  const clock = manualClock();
  client.subscribePusher(pusher, collector().opts({ setTimer: clock.setTimer, clearTimer: clock.clearTimer }));
  const seen = [];
  for (let i = 0; i < 7; i++) {
    pusher.current().emit("pusher:subscription_error", { status: 503 });
    seen.push(clock.delays()[0]);
    clock.advance(seen[i]);
  }
  assert.deepEqual(seen, [1000, 2000, 4000, 8000, 16000, 30000, 30000]);
});
