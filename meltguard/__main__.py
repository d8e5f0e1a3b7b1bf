from meltguard.daemon.cli import main

raise SystemExit(main())
