-- GET /jobs/{id} for ids read from the file named after `--` (one id a line), at random.
local ids = {}
function init(args)
   for line in io.lines(args[1]) do ids[#ids + 1] = line end
   math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end
function request()
   return wrk.format("GET", "/jobs/" .. ids[math.random(#ids)])
end
