-- GET the URL as given.
wrk.method = "GET"
