"""The dead letters' Lua: one atomic add (bounded in entries, bytes and age, deduplicated),
a requeue and a purge chunk (``worker/broker/deadletters.py`` is their Python side).

:data:`LUA_DEAD_LETTER` defines the function ``dead_letter(...)``, which other scripts (the
intake, the settle script) prepend and call, so a message is recorded atomically with whatever
else they do.
"""

from __future__ import annotations

import string

__all__ = [
    "CHUNK",
    "DELIVERIES_PREFIX",
    "DETAIL_BYTES",
    "FIELD_BYTES",
    "HEAD_BYTES",
    "LUA_DEAD_LETTER",
]

#: Bytes of the raw message each entry shows, enough to recognise a message or an attack.
HEAD_BYTES = 200
#: Longest ``detail`` kept, and longest ``task_id``/``worker``/``reason``, in bytes (cut on a
#: UTF-8 character boundary): a malformed message's task id is whatever its sender wrote.
DETAIL_BYTES = 500
FIELD_BYTES = 200
#: Entries and bodies one script call cleans up, so that no call blocks Redis for long.
CHUNK = 1000
#: The worker's per-message delivery counter, reset by a requeue (key = prefix + sha1).
DELIVERIES_PREFIX = "imgq:deliveries:"

# Lua 5.1 in Redis. Helpers are prefixed `dl_` so that a script that prepends this one keeps
# its own names. Integers go through dl_int: tostring() prints large ones as 1e+12.
_LUA_TEMPLATE = r"""
local function dl_int(n) return string.format('%d', n) end
local function dl_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function dl_fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
local function dl_member(member)  -- "<entry id>:<length>" of the bodies sorted set
  local id, len = string.match(member, '^(.*):(%d+)$$')
  return id, tonumber(len)
end
local function dl_cut(text, n)  -- at most n bytes, not splitting a UTF-8 character
  if #text <= n then return text end
  while n > 0 and string.byte(text, n + 1) >= 128 and string.byte(text, n + 1) < 192 do
    n = n - 1
  end
  return string.sub(text, 1, n)
end
-- Forget an entry's side keys (its body, its de-duplication key); the bytes it freed.
local function dl_forget(stream, id, f)
  local seen, freed = stream .. ':seen:' .. (f.sha1 or ''), 0
  if redis.call('GET', seen) == id then redis.call('DEL', seen) end
  if f.body == 'kept' then
    redis.call('DEL', stream .. ':body:' .. id)
    if redis.call('ZREM', stream .. ':bodies', id .. ':' .. f.length) == 1 then
      freed = tonumber(f.length)
    end
  end
  return freed
end
local function dl_unaccount(bytes_key, freed)  -- the kept bodies' total, less freed bytes
  if freed > 0 and redis.call('DECRBY', bytes_key, dl_int(freed)) < 0 then
    redis.call('SET', bytes_key, '0', 'KEEPTTL')
  end
end

-- keep: '1' keeps the body within the budget; 'too_large' records a message dropped unread for
-- its size (the intake); anything else records the body as not kept.
local function dead_letter(queue, body, length, sha1, head, reason, detail, task_id, worker,
                           keep, ttl_s, max_entries, max_body_bytes)
  local stream = 'imgq:dlq:' .. queue
  local bodies, bytes_key = stream .. ':bodies', stream .. ':bytes'
  ttl_s, max_entries = tonumber(ttl_s), tonumber(max_entries)
  max_body_bytes = tonumber(max_body_bytes)
  if body then
    length, head = #body, head or body
    if not sha1 or sha1 == '' then sha1 = redis.sha1hex(body) end
  end
  length, sha1 = tonumber(length) or 0, sha1 or ''
  local seen = stream .. ':seen:' .. sha1
  if sha1 ~= '' then
    local existing = redis.call('GET', seen)
    if existing and #redis.call('XRANGE', stream, existing, existing) > 0 then
      return existing
    end
  end
  local min_ms = dl_now_ms() - ttl_s * 1000
  local total = tonumber(redis.call('GET', bytes_key) or '0')
  -- Bodies older than the TTL: their keys have expired; take them out of the accounting.
  local old = redis.call('ZRANGEBYSCORE', bodies, '-inf', '(' .. dl_int(min_ms), 'LIMIT', 0, $chunk)
  for _, member in ipairs(old) do
    local id, len = dl_member(member)
    redis.call('DEL', stream .. ':body:' .. id)
    redis.call('ZREM', bodies, member)
    total = total - len
  end
  -- Exact trims (MINID ~ keeps whole radix-tree nodes of old entries): by age, then by count
  -- with the side keys of the dropped entries (their de-duplication keys would pile up).
  redis.call('XTRIM', stream, 'MINID', dl_int(min_ms))
  local excess = math.min(redis.call('XLEN', stream) - max_entries + 1, $chunk)
  if excess > 0 then
    for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)) do
      total = total - dl_forget(stream, entry[1], dl_fields(entry[2]))
      redis.call('XDEL', stream, entry[1])
    end
  end
  local state = 'kept'
  if keep == 'too_large' then state = 'too_large'
  elseif keep ~= '1' and keep ~= 1 and keep ~= true then state = 'not_kept'
  elseif length > max_body_bytes or max_body_bytes <= 0 then state = 'over_budget'
  elseif not body then state = 'too_large'
  end
  while state == 'kept' and total + length > max_body_bytes do  -- evict the oldest bodies
    local popped = redis.call('ZPOPMIN', bodies)
    if #popped == 0 then total = 0 else
      local id, len = dl_member(popped[1])
      redis.call('DEL', stream .. ':body:' .. id)
      total = total - len
    end
  end
  local id = redis.call('XADD', stream, 'MAXLEN', '~', dl_int(max_entries), '*',
    'reason', dl_cut(reason, $field_bytes), 'detail', dl_cut(detail or '', $detail_bytes),
    'task_id', dl_cut(task_id or '', $field_bytes), 'length', dl_int(length), 'sha1', sha1,
    'head', string.sub(head or '', 1, $head_bytes), 'worker', dl_cut(worker or '', $field_bytes),
    'body', state)
  if state == 'kept' then
    redis.call('SET', stream .. ':body:' .. id, body, 'EX', ttl_s)
    redis.call('ZADD', bodies, string.match(id, '^(%d+)'), id .. ':' .. dl_int(length))
    total = total + length
  end
  redis.call('SET', bytes_key, dl_int(math.max(total, 0)), 'EX', ttl_s)
  redis.call('EXPIRE', stream, ttl_s)
  redis.call('EXPIRE', bodies, ttl_s)
  if sha1 ~= '' then redis.call('SET', seen, id, 'EX', ttl_s) end
  return id
end
"""
LUA_DEAD_LETTER = string.Template(_LUA_TEMPLATE).substitute(
    chunk=CHUNK, detail_bytes=DETAIL_BYTES, field_bytes=FIELD_BYTES, head_bytes=HEAD_BYTES
)

# ARGV: the parameters of dead_letter in order; an empty body with a length > 0 means "not sent".
_ADD = (
    LUA_DEAD_LETTER
    + r"""
local body = ARGV[2]
if body == '' and ARGV[3] ~= '0' then body = false end
return dead_letter(ARGV[1], body, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9],
                   ARGV[10], ARGV[11], ARGV[12], ARGV[13])
"""
)

# ARGV: queue, entry id, ttl_s. Returns {'ok', fields} | {'unknown'} | {'not_kept', state}.
_REQUEUE = (
    LUA_DEAD_LETTER
    + f"""
local queue, id = ARGV[1], ARGV[2]
local stream = 'imgq:dlq:' .. queue
local found = redis.call('XRANGE', stream, id, id)
if #found == 0 then return {{'unknown'}} end
local f = dl_fields(found[1][2])
if f.body ~= 'kept' then return {{'not_kept', f.body}} end
local body = redis.call('GET', stream .. ':body:' .. id)
if not body then
  local age_ms = dl_now_ms() - tonumber(string.match(id, '^(%d+)'))
  return {{'not_kept', age_ms >= tonumber(ARGV[3]) * 1000 and 'expired' or 'evicted'}}
end
redis.call('LPUSH', queue, body)
dl_unaccount(stream .. ':bytes', dl_forget(stream, id, f))
redis.call('XDEL', stream, id)
redis.call('DEL', '{DELIVERIES_PREFIX}' .. f.sha1)
return {{'ok', found[1][2]}}
"""
)

# ARGV: queue, newest entry id to delete ('+': all). Deletes a chunk of entries with their side
# keys; once none is left, bodies whose entry is gone. Returns {entries deleted, more to do}.
_PURGE_CHUNK = (
    LUA_DEAD_LETTER
    + f"""
local stream = 'imgq:dlq:' .. ARGV[1]
local bodies, bytes_key = stream .. ':bodies', stream .. ':bytes'
local freed, more, swept = 0, 0, 0
local entries = redis.call('XRANGE', stream, '-', ARGV[2], 'COUNT', {CHUNK})
for _, entry in ipairs(entries) do
  freed = freed + dl_forget(stream, entry[1], dl_fields(entry[2]))
  redis.call('XDEL', stream, entry[1])
end
if #entries == {CHUNK} then more = 1 else
  local last_ms = ARGV[2] == '+' and '+inf' or string.match(ARGV[2], '^(%d+)')
  local orphans = redis.call('ZRANGEBYSCORE', bodies, '-inf', last_ms, 'LIMIT', 0, {CHUNK})
  for _, member in ipairs(orphans) do
    local id, len = dl_member(member)
    if #redis.call('XRANGE', stream, id, id) == 0 then
      redis.call('DEL', stream .. ':body:' .. id)
      redis.call('ZREM', bodies, member)
      freed, swept = freed + len, swept + 1
    end
  end
  if #orphans == {CHUNK} and swept > 0 then more = 1 end
end
dl_unaccount(bytes_key, freed)
if redis.call('XLEN', stream) == 0 then redis.call('DEL', stream) end
if redis.call('ZCARD', bodies) == 0 then redis.call('DEL', bodies, bytes_key) end
return {{#entries, more}}
"""
)
