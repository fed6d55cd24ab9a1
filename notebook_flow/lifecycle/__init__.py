"""Cache lifecycle: last use, quotas and eviction, gc rules, pins from the command line.

Top to bottom: :mod:`.usage` records last use on the hit path (a dict write; a background
thread writes rate-limited "touch" files into the store, which every process and machine
sees), :mod:`.inventory` lists a store's entries with their sizes, last use and pins
(from directory listings alone, each shard folder listed again only when it changed:
:mod:`.shards`),
:mod:`.rules` decides what goes (LRU down to a size, age, unused, unreachable code),
:mod:`.evict` removes entries so that two processes never remove the same one twice and a
reader racing with a removal gets a miss, and :mod:`.quota` runs eviction in the
background after a commit pushes a store over its quota. :mod:`.gc` and
:mod:`.pins_cli` are the ``notebook-flow gc`` / ``pin`` / ``unpin`` commands, and
:mod:`.status` the summary the dashboard shows (size against quota, pins, what gc would
free). Pins themselves are :mod:`notebook_flow.storage.pins` (markers in the store).

Nothing here imports the task layer or a front end; the call path calls
``usage.touch`` (hits) and ``quota.committed`` (commits).

Integrity and sharing: :mod:`.check` verifies every entry and quarantines bad ones
(``notebook-flow check [--fix]``), :mod:`.transfer` copies entries between stores,
verified with the source's key and re-signed with the destination's (``export`` /
``import``); :mod:`.cli` holds those three commands and :mod:`.progress` their bar.
"""
