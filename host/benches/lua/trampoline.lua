-- The event trampoline's message table, two shapes side by side: today's
-- twelve fields (esc's capitalised names and lower-case aliases) against
-- six fields with a metatable answering the capitalised names. Run under
-- `covey exec` (and `lua5.4` for reference); prints us per call. `old` is
-- a copy of `INVOKE` in lua-guest/src/api.rs: keep the two alike.
local old = function(f, from, to, name, payload, id, ts)
  return f({
    From = from, from = from, To = to, to = to, Name = name, name = name,
    Payload = payload, payload = payload, Id = id, id = id,
    Timestamp = ts, timestamp = ts,
  })
end
local alias = { From = "from", To = "to", Name = "name", Payload = "payload", Id = "id", Timestamp = "timestamp" }
local meta = { __index = function(t, k) local a = alias[k]; if a then return rawget(t, a) end end }
local setmetatable = setmetatable
local new = function(f, from, to, name, payload, id, ts)
  return f(setmetatable({ from = from, to = to, name = name, payload = payload, id = id, timestamp = ts }, meta))
end
local seen = 0
local function h(msg) seen = seen + 1 end
local payload = string.rep("x", 64)
for _ = 1, 3 do
  for _, v in ipairs({{"12 fields", old}, {"6 + meta", new}}) do
    local t0 = os.clock()
    for i = 1, 1000000 do v[2](h, "n1", "*", "bench", payload, i, 1700000000000) end
    print(v[1], string.format("%.3f us/call", os.clock() - t0)) -- 1e6 calls: s = us/call
  end
end
-- Every call reached the handler (3 rounds x 2 shapes x 1e6).
assert(seen == 6000000, seen)
