-- CPU-bound Lua workloads, timed by the script itself. Run by the runtime
-- benchmark under Debian's lua5.4 and under `covey exec`, side by side.
-- Prints one line per workload: <name> <seconds>.

local function timed(name, f)
  local best = math.huge
  for _ = 1, 3 do
    local t0 = os.clock()
    f()
    local dt = os.clock() - t0
    if dt < best then best = dt end
  end
  print(string.format("%s %.6f", name, best))
end

local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end

timed("fib(27)", function() assert(fib(27) == 196418) end)

timed("string-build", function()
  local parts = {}
  for i = 1, 200000 do parts[#parts + 1] = string.format("%d:%x;", i, i * 7) end
  local s = table.concat(parts)
  assert(#s > 1000000)
  local n = 0
  for _ in s:gmatch("(%d+):") do n = n + 1 end
  assert(n == 200000)
end)

timed("table-sort", function()
  local t, x = {}, 42
  for i = 1, 200000 do
    x = (x * 1103515245 + 12345) % 2147483648
    t[i] = x
  end
  table.sort(t)
  for i = 2, #t do assert(t[i - 1] <= t[i]) end
end)
