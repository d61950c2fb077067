"""The process layer: entry point (:mod:`.main`), one serving process
(:mod:`.server`), the worker supervisor (:mod:`.workers`), reload, connection
caps and process-wide tuning. Imports point one way: main -> workers -> server."""
