"""The intake's Lua: give back, restore dead workers' lanes, release at shutdown, and sort out
a lane after a take whose reply was refused or lost (``worker/broker/intake.py`` is their Python
side, and its docstring the protocol they implement).
"""

from __future__ import annotations

from imgq.worker.broker.deadletters_lua import LUA_DEAD_LETTER

__all__ = ["GIVE_BACK_ALL", "GIVE_BACK_NEWEST", "GIVE_BACK_UNKNOWN", "RECOVER", "RELEASE",
           "RESTORE"]  # fmt: skip

# Moves the first `count` (all when count < 0) messages at the left (newest) end of a lane to the
# right (consuming) end of its queue, newest first, so that the oldest ends up served first.
GIVE_BACK_FN = """
local function give_back(lane, queue, count)
  local moved = 0
  while count < 0 or moved < count do
    if not redis.call('LMOVE', lane, queue, 'LEFT', 'RIGHT') then break end
    moved = moved + 1
  end
  return moved
end
-- Gives back a whole lane, counting one delivery without a result per message (a message whose
-- result exists, under prefix, was answered: not counted, back to the queue); a counted message
-- goes to the suspect list, or at max_deliveries to the poison list.
local function answered(m, prefix)
  if prefix == '' then return false end
  local id = string.match(string.sub(m, -4096), '[{,]%s*"id"%s*:%s*"([^"\\]+)"')
  return id ~= nil and redis.call('EXISTS', prefix .. id) == 1
end
local function give_back_counted(lane, queue, max_deliveries, ttl_s, prefix)
  local moved = 0
  while true do
    local m = redis.call('LPOP', lane)
    if not m then break end
    if answered(m, prefix) then
      redis.call('RPUSH', queue, m)
    else
      local counter = 'imgq:deliveries:' .. redis.sha1hex(m)
      local n = redis.call('INCR', counter)
      redis.call('EXPIRE', counter, ttl_s)
      if n >= max_deliveries then
        redis.call('LPUSH', 'imgq:poison:' .. queue, m)
      else
        redis.call('RPUSH', 'imgq:suspect:' .. queue, m)
      end
    end
    moved = moved + 1
  end
  return moved
end
"""

# KEYS: lanes hash. ARGV: max deliveries, counter ttl, result key prefix ('' when results live
# elsewhere), this worker's id, then each of its runners' current seq. Gives back every lane
# whose worker has no lease (counted), and this worker's lanes of batches it has already acked
# (Redis came back with older data; not counted). Returns {moved, stale}.
RESTORE = (
    GIVE_BACK_FN
    + """
local max_deliveries, ttl_s, prefix, me = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local moved, stale = 0, 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local lane, queue = flat[i], flat[i + 1]
  local worker, runner, seq = string.match(lane, '^imgq:inflight:(.*):(%d+):b(%d+)$')
  if not worker then worker = string.match(lane, '^imgq:inflight:(.*):%d+$') end
  if worker == me then
    local current = tonumber(ARGV[5 + tonumber(runner or -1)] or '')
    if seq and current and tonumber(seq) < current then
      stale = stale + give_back(lane, queue, -1)
      redis.call('HDEL', KEYS[1], lane)
    end
  elseif worker and redis.call('EXISTS', 'imgq:lease:' .. worker) == 0 then
    moved = moved + give_back_counted(lane, queue, max_deliveries, ttl_s, prefix)
    redis.call('HDEL', KEYS[1], lane)
  end
end
return {moved, stale}
"""
)

# KEYS: lane, queue. ARGV: how many messages (at the right end) the runner holds. Gives back the
# rest: those of a take whose reply was lost. Safe to repeat.
GIVE_BACK_UNKNOWN = (
    GIVE_BACK_FN
    + """
return give_back(KEYS[1], KEYS[2], math.max(0, redis.call('LLEN', KEYS[1]) - tonumber(ARGV[1])))
"""
)

# KEYS: lane, queue. ARGV: how many. Gives back the newest messages of a batch (served in parts).
GIVE_BACK_NEWEST = GIVE_BACK_FN + "return give_back(KEYS[1], KEYS[2], tonumber(ARGV[1]))"

# KEYS: lane, queue, lanes hash. Gives back a whole batch not started (a stopping worker's batch
# taken ahead), in order, and unregisters its lane.
GIVE_BACK_ALL = (
    GIVE_BACK_FN
    + """
local moved = give_back(KEYS[1], KEYS[2], -1)
redis.call('HDEL', KEYS[3], KEYS[1])
return moved
"""
)

# KEYS: lanes hash, lease, fleet members, fleet missing (worker/broker/fleet.py). ARGV: queue, max
# deliveries, counter ttl, this worker's id. A worker giving back everything it holds (counted:
# those messages got no result), its lease and its fleet membership (a clean shutdown).
RELEASE = (
    GIVE_BACK_FN
    + """
local moved = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local worker = string.match(flat[i], '^imgq:inflight:(.*):%d+:b%d+$')
  if worker == ARGV[4] then
    moved = moved + give_back_counted(flat[i], flat[i + 1], tonumber(ARGV[2]), tonumber(ARGV[3]),
      ARGV[5])
    redis.call('HDEL', KEYS[1], flat[i])
  end
end
redis.call('DEL', KEYS[2])
redis.pcall('HDEL', KEYS[3], ARGV[4])  -- pcall: a fleet key Redis refuses fails no release
redis.pcall('HDEL', KEYS[4], ARGV[4])
return moved
"""
)

# KEYS: lane, queue, lanes hash. ARGV: messages held (right end), most bytes per message, byte
# budget of the batch, max deliveries, this worker's id, dead-letter ttl, max entries, max body
# bytes. Sorts out what the lane holds beyond `held` (a take whose reply was too large or lost),
# oldest first: a message over the size limit goes to the dead letters (metadata only); the rest
# is kept up to the byte budget (at least one), flagged when its delivery count makes it a
# poison pill; what does not fit goes back to the head of the queue. Returns one entry per
# message, oldest first: {'m', poisoned 0/1, message} or {'big', length, sha1, head, tail} (4.5 kB
# of fragments: the few oversized messages one call reads keep the reply within the capped
# client's slack).
#
# The messages are read one by one (LINDEX), at most READ_LIMIT size limits' worth per call, and
# never written back: what goes back moves with LMOVE, what is kept stays, oversized ones are
# overwritten by a tombstone and removed. So one call copies a bounded number of bytes, and the
# append-only file and replicas get small commands, not the messages (reading and rewriting a GB
# of near-limit messages blocked Redis past its clients' socket timeouts).
RECOVER = (
    LUA_DEAD_LETTER
    + """
local READ_LIMIT = 4
local lane, queue = KEYS[1], KEYS[2]
local held, max_bytes, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_deliveries = tonumber(ARGV[4])
local extra = redis.call('LLEN', lane) - held
local out = {}
if extra <= 0 then return out end
redis.call('HSET', KEYS[3], lane, queue)
-- Oldest first, one LINDEX at a time (each copies its message into Lua), until the batch is
-- decided or READ_LIMIT bytes were read; the rest goes back unread.
local kept_n, total, read, big_at, n_back = 0, 0, 0, {}, 0
for j = extra - 1, 0, -1 do
  if read >= READ_LIMIT * max_bytes then
    n_back = j + 1
    break
  end
  local m = redis.call('LINDEX', lane, j)
  read = read + #m
  if #m > max_bytes then
    big_at[#big_at + 1] = j
    local sha1 = redis.sha1hex(m)
    local tail = string.sub(m, -4096)
    local task_id = string.match(tail, '[{,]%s*"id"%s*:%s*"([^"\\]+)"') or ''
    dead_letter(queue, false, #m, sha1, string.sub(m, 1, 200), 'message_too_large',
      'a message of ' .. #m .. ' bytes is over the ' .. max_bytes .. ' a valid task can have',
      task_id, ARGV[5], 'too_large', ARGV[6], ARGV[7], ARGV[8])
    out[#out + 1] = {'big', tostring(#m), sha1, string.sub(m, 1, 512), tail}
  elseif #m <= max_bytes and (kept_n == 0 or total + #m <= budget) then
    kept_n = kept_n + 1
    total = total + #m
    local n = tonumber(redis.call('GET', 'imgq:deliveries:' .. redis.sha1hex(m)) or '0')
    out[#out + 1] = {'m', n >= max_deliveries and '1' or '0', m}
  else
    n_back = j + 1  -- this one and every newer message go back: lane[0..j]
    break
  end
end
-- The newest first to the consuming end: the oldest of them ends up served first.
for _ = 1, n_back do redis.call('LMOVE', lane, queue, 'LEFT', 'RIGHT') end
if #big_at > 0 then
  local t = redis.call('TIME')
  local tombstone = '\\0imgq:removed:' .. lane .. ':' .. t[1] .. '.' .. t[2]
  for _, j in ipairs(big_at) do redis.call('LSET', lane, j - n_back, tombstone) end
  redis.call('LREM', lane, 0, tombstone)
end
return out
"""
)
