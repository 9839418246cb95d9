from smtpgate.cli import main

main()
